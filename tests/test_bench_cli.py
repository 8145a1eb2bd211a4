"""`slidesparse bench` (bench/cli.py): bad input is one line."""

from __future__ import annotations


def test_bench_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner
    from slidesparse.bench.cli import app
    r = CliRunner().invoke(app, ["kernel", "--report-only", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "error:" in r.output
