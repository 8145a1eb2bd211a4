"""End-to-end prefill / decode benchmark: stock `vllm bench throughput` on several checkpoints.

Every variant runs as its own `vllm bench throughput` process (a fresh engine, so one variant's
compile caches or memory cannot help another), one after another in a single invocation, so the
baseline and the SlideSparse checkpoints are measured on the same machine in the same run. The
report is relative to the first variant (the baseline) of each workload.

Workloads (the same as the numbers quoted in DEVELOPERS.md):
    prefill  2048 input tokens, 1 output token, 16384 batched tokens  -> total tokens/s
    decode   16 input tokens, 256 output tokens, 256 sequences        -> output tokens/s
"""

from __future__ import annotations

import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.io import atomic_write

WORKLOADS = {
    "prefill": dict(input_len=2048, output_len=1, num_prompts=256, max_batched=16384, metric="tokens_per_second"),
    "decode": dict(input_len=16, output_len=256, num_prompts=256, max_batched=16384, metric="output_tokens_per_second"),
}


@dataclass
class Variant:
    name: str            # label in the report, e.g. "bf16", "fp8 (dense)", "2_8 fp8"
    model: str           # checkpoint directory
    extra: tuple[str, ...] = ()   # extra vLLM args, e.g. ("--quantization", "fp8")


def parse_variant(spec: str) -> Variant:
    """'NAME=PATH' or 'NAME=PATH::--quantization fp8' (extra vLLM args after '::')."""
    if "=" not in spec:
        raise ValueError(f"bad variant {spec!r}: expected NAME=CHECKPOINT[::EXTRA VLLM ARGS]")
    name, rest = spec.split("=", 1)
    model, _, extra = rest.partition("::")
    if not Path(model).is_dir():
        raise ValueError(f"variant {name}: checkpoint directory {model!r} does not exist")
    return Variant(name.strip(), model.strip(), tuple(shlex.split(extra)))


def command(v: Variant, wl: str, out_json: str, vllm: str = "vllm") -> list[str]:
    w = WORKLOADS[wl]
    return bench_command(v.model, w["input_len"], w["output_len"], w["num_prompts"], w["max_batched"],
                         w["input_len"] + w["output_len"] + 16, out_json, vllm, v.extra)


def bench_command(model: str, input_len: int, output_len: int, num_prompts: int, max_batched: int,
                  max_model_len: int, out_json: str, vllm: str | list[str] = "vllm",
                  extra: tuple[str, ...] = ()) -> list[str]:
    """`vllm bench throughput` on the random dataset (also the matrix driver's cross-check).
    `vllm` is the executable, or an argv prefix such as [python, -m, vllm.entrypoints.cli.main]."""
    # the random dataset ignores --input-len / --output-len: its own flags carry the lengths
    return [*([vllm] if isinstance(vllm, str) else vllm), "bench", "throughput", "--model", model,
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-num-batched-tokens", str(max_batched),
            "--max-model-len", str(max_model_len), "--output-json", out_json, *extra]


def run_one(v: Variant, wl: str, timeout: float, vllm: str = "vllm", log_dir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out_json = os.path.join(td, "r.json")
        cmd = command(v, wl, out_json, vllm)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.time() - t0
        if log_dir is not None:
            (log_dir / f"{wl}_{_slug(v.name)}.log").write_text(p.stdout + "\n" + p.stderr)
        if p.returncode != 0 or not os.path.exists(out_json):
            tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
            return {"variant": v.name, "workload": wl, "ok": False, "wall_s": wall, "command": shlex.join(cmd),
                    "error": " | ".join(tail)}
        r = json.load(open(out_json))
    w = WORKLOADS[wl]
    out_tokens = r["num_requests"] * w["output_len"]
    res = {"variant": v.name, "workload": wl, "ok": True, "wall_s": wall, "command": shlex.join(cmd),
           "elapsed_s": r["elapsed_time"], "requests_per_second": r["requests_per_second"],
           "tokens_per_second": r["tokens_per_second"], "output_tokens_per_second": out_tokens / r["elapsed_time"]}
    res["value"] = res[w["metric"]]
    return res


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)


def run(variants: list[Variant], workloads: list[str], out_dir: Path, timeout: float = 600,
        vllm: str = "vllm", title: str = "") -> dict:
    from rich.console import Console
    from rich.progress import Progress

    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    results = []
    with Progress(console=console) as prog:
        task = prog.add_task("vllm bench throughput", total=len(variants) * len(workloads))
        for wl in workloads:
            for v in variants:
                prog.update(task, description=f"{wl}: {v.name}")
                r = run_one(v, wl, timeout, vllm, out_dir)
                results.append(r)
                msg = f"{r['value']:,.0f} tok/s" if r["ok"] else f"FAILED: {r['error']}"
                console.print(f"  {wl:8s} {v.name:24s} {msg}  ({r['wall_s']:.0f} s wall)")
                prog.advance(task)
    report = {"title": title, "host": platform.node(), "python": sys.version.split()[0],
              "argv": shlex.join(sys.argv), "workloads": {k: WORKLOADS[k] for k in workloads},
              "variants": [v.__dict__ | {"extra": list(v.extra)} for v in variants],
              "results": results, "gpu": _gpu_name(), "versions": _versions()}
    atomic_write(out_dir / "e2e.json", json.dumps(report, indent=2).encode())
    atomic_write(out_dir / "e2e.md", markdown(report).encode())
    try:
        plot(report, out_dir / "e2e.png")
    except ImportError:
        console.print("matplotlib not installed: no plot")
    return report


def _gpu_name() -> str | None:
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - best-effort label only
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("vllm", "torch", "triton", "slidesparse"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def markdown(report: dict) -> str:
    lines = [f"# End-to-end throughput{': ' + report['title'] if report['title'] else ''}", "",
             f"GPU: {report['gpu']}; versions: {report['versions']}", "",
             f"Command: `{report['argv']}`", ""]
    for wl, w in report["workloads"].items():
        rows = [r for r in report["results"] if r["workload"] == wl]
        base = next((r for r in rows if r["ok"]), None)
        lines += [f"## {wl}: {w['input_len']} in, {w['output_len']} out, {w['num_prompts']} prompts, "
                  f"{w['max_batched']} batched tokens ({w['metric'].replace('_', ' ')})", "",
                  "| variant | tok/s | vs " + (base["variant"] if base else "baseline") + " |", "|---|---:|---:|"]
        for r in rows:
            if r["ok"]:
                lines.append(f"| {r['variant']} | {r['value']:,.0f} | {r['value'] / base['value']:.3f}x |")
            else:
                lines.append(f"| {r['variant']} | failed: {r['error'][:120]} | |")
        lines.append("")
    lines += ["Each row is one `vllm bench throughput` process; commands are in e2e.json.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(report["workloads"])
    fig, axes = plt.subplots(1, len(wls), figsize=(6 * len(wls), 4), squeeze=False)
    for ax, wl in zip(axes[0], wls):
        rows = [r for r in report["results"] if r["workload"] == wl and r["ok"]]
        if not rows:
            continue
        base = rows[0]["value"]
        ax.bar([r["variant"] for r in rows], [r["value"] / base for r in rows], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{wl} ({report['workloads'][wl]['metric'].replace('_', ' ')})")
        ax.set_ylabel(f"speed-up vs {rows[0]['variant']}")
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(rows):
            ax.text(i, r["value"] / base, f"{r['value'] / 1000:.0f}k", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"vLLM end-to-end, {report['gpu'] or 'CPU'}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, buf.getvalue())
