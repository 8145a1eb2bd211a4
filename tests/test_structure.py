"""The package's layering (docs/architecture.md), read from the source with ast: core imports
nothing of SlideSparse outside core; kernels import only core (and each other); the runtime
never imports the converter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "slidesparse"
ALLOWED = {  # subpackage -> the subpackages it may import
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "runtime": {"core", "kernels", "runtime"},
}


def _imports(path: Path) -> set[str]:
    """The slidesparse subpackages a module imports (absolute or relative, at any depth)."""
    rel = path.relative_to(PKG).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]  # the package the dots point at
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if parts else [[a.name] for a in node.names]
            else:
                mod = (node.module or "").split(".")
                names = [mod[1:]] if mod[0] == "slidesparse" else []
            out.update(p[0] for p in names if p)
        elif isinstance(node, ast.Import):
            for a in node.names:
                mod = a.name.split(".")
                if mod[0] == "slidesparse" and len(mod) > 1:
                    out.add(mod[1])
    return out


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_layering(sub):
    files = sorted((PKG / sub).rglob("*.py"))
    assert files
    for f in files:
        bad = _imports(f) - ALLOWED[sub] - {"__init__"}
        assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    fake = tmp_path / "slidesparse" / "kernels"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from ..runtime.backend import Backend\nimport slidesparse.convert.pipeline\n"
                               "from ..core import pattern\nfrom . import dense\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "slidesparse")
    assert _imports(fake / "x.py") == {"runtime", "convert", "core", "kernels"}
