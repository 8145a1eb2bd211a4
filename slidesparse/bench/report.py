"""Kernel-benchmark outputs: CSV + JSON (all rows), a markdown summary with the targets, a PNG plot.

Each file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from ..core.io import atomic_write

TARGETS = [  # (preset, M, dtype, sparsity, min speedup summed over the four shapes, part)
    # the performance issue: the tuned layer as vLLM runs it, against vLLM's CUTLASS dense
    ("qwen2.5-7b", 16384, "fp8_e4m3", "2_8", 1.05, "tuned"),
    # the GEMM issue's bar (GEMM with its epilogue): cuSPARSELt's GEMM + our dequant pass, for reference
    ("qwen2.5-7b", 16384, "fp8_e4m3", "2_8", 1.20, "gemm+dequant"),
    ("qwen2.5-7b", 16384, "int8", "2_8", 1.20, "gemm+dequant"),
    ("qwen2.5-7b", 16384, "fp8_e4m3", "2_4", 1.70, "gemm+dequant"),
]
PARTS = {  # what a summed speed-up compares: (dense parts, sparse parts); several parts are added
    "linear": (("linear",), ("linear",)),
    "traced": (("traced",), ("traced",)),
    "gemm": (("gemm",), ("gemm",)),
    "gemm+dequant": (("gemm",), ("gemm", "dequant")),
}
QUANT_BW_TARGET = 0.75
LAYERS = ("qkv", "o", "gate_up", "down")


def _index(rows):
    t = {}
    for r in rows:
        t[(r["preset"], r["layer"], r["m"], r["dtype"], r["variant"], r["part"])] = r
    return t


def summed_speedup(rows, preset, m, dtype, sparsity, part="linear"):
    """sum over the preset's four shapes of dense time / the same sum for the sparsity.

    part "tuned": per shape the fastest traced form the tuner can choose (all-cuSPARSELt, a
    cuSPARSELt bucket of a mixed plan, the CUTLASS kernel, or dense), against the dense traced layer."""
    t = _index(rows)
    layers = LAYERS  # all four, or no sum: a partial sum would flatter or hide a shape
    try:
        if part == "tuned":
            d = sum(t[(preset, ly, m, dtype, "dense", "traced")]["ms"] for ly in layers)
            s = sum(min([t[(preset, ly, m, dtype, "dense", "traced")]["ms"]]
                        + [t[(preset, ly, m, dtype, sparsity, p)]["ms"]
                           for p in ("traced", "traced_in_op", "traced_cutlass")
                           if (preset, ly, m, dtype, sparsity, p) in t])
                    for ly in layers)
            return d / s
        dparts, sparts = PARTS[part]
        d = sum(t[(preset, ly, m, dtype, "dense", p)]["ms"] for ly in layers for p in dparts)
        s = sum(t[(preset, ly, m, dtype, sparsity, p)]["ms"] for ly in layers for p in sparts)
    except KeyError:
        return None
    return d / s


def quant_bandwidth(rows, copy_gbs):
    """Achieved bytes/s of quant+slide (x read once in bf16, x' written, scales) per row."""
    out = []
    for r in rows:
        if r["part"] != "quant":
            continue
        kq = -(-r["k_lifted"] // 64) * 64
        mp = -(-r["m"] // 16) * 16
        nbytes = r["m"] * r["k"] * 2 + mp * kq + r["m"] * 4
        gbs = nbytes / (r["ms"] * 1e-3) / 1e9
        out.append({**{k: r[k] for k in ("preset", "layer", "m", "k", "dtype", "variant")},
                    "gbs": gbs, "frac_copy": gbs / copy_gbs})
    return out


def markdown(rows, env: dict) -> str:
    b = io.StringIO()
    w = b.write
    w(f"# Kernel benchmark: {env.get('device')}\n\n")
    w(f"Command: `{env.get('command')}`  \n")
    if env.get("note"):
        w(f"{env['note']}\n\n")
    if env.get("partial"):
        w("**Partial run: interrupted before every configuration was measured.**\n\n")
    w(f"torch {env.get('torch')}, triton {env.get('triton')}, cuSPARSELt {env.get('cusparselt_loaded') or env.get('cusparselt')}"
      f" (torch built with {env.get('cusparselt')}); "
      f"device-to-device copy {env.get('copy_gbs', 0):.0f} GB/s (read + write). "
      f"Times are medians of interleaved rounds of CUDA-graph replays (ms per call).\n\n")
    kern = env.get("dense_kernel") or {}
    w("Dense baseline (variant `dense`): " + (", ".join(f"{dt}: `{k}`" for dt, k in kern.items()) or "see the impl column")
      + ("" if all(k == "vllm_cutlass" for k in kern.values()) and kern else
         " (**not** vLLM's CUTLASS kernel: vLLM was not importable in this run)") + ".\n\n")
    w("## Targets (summed over the four shapes)\n\n| preset | M | dtype | sparsity | part | speedup | target | met |\n"
      "|---|---|---|---|---|---|---|---|\n")
    for preset, m, dt, sp, tgt, part in TARGETS:
        s = summed_speedup(rows, preset, m, dt, sp, part)
        if s is None:
            w(f"| {preset} | {m} | {dt} | {sp} | {part} | not measured | {tgt}x | - |\n")
        else:
            w(f"| {preset} | {m} | {dt} | {sp} | {part} | {s:.3f}x | {tgt}x | {'yes' if s >= tgt else 'NO'} |\n")
    w("\n`tuned`: per shape, the fastest traced form measured at this M alone (all-dense, all-cuSPARSELt, a "
      "mixed plan's cuSPARSELt bucket, CUTLASS). `slidesparse tune` chooses one plan per layer over all of "
      "its M buckets (`--objective`), so a served model can run a slower form at this M than the one "
      "counted here: its slidesparse_tuning.json says which, the e2e benchmark what it gives.\n")
    dense_cols = sorted({r["variant"] for r in rows if r["variant"].startswith("dense:")})
    if dense_cols:
        w("\n## Dense GEMM kernels (GEMM with scales in its epilogue, summed over the four shapes, ms)\n\n"
          "| preset | dtype | M | dense | " + " | ".join(c.split(":", 1)[1] for c in dense_cols) + " |\n"
          "|---|---|---|---|" + "---|" * len(dense_cols) + "\n")
        for p, dt, m in sorted({(r["preset"], r["dtype"], r["m"]) for r in rows}):
            base = summed_ms(rows, p, m, dt, "dense", "gemm")
            if base is None:
                continue
            cells = [summed_ms(rows, p, m, dt, c, "gemm") for c in dense_cols]
            w(f"| {p} | {dt} | {m} | {base:.3f} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |\n")
    bw = quant_bandwidth(rows, env.get("copy_gbs", 1))
    if bw:
        big = [r for r in bw if r["m"] >= 4096]
        if big:
            fr = sorted(r["frac_copy"] for r in big)
            w(f"\nquant+slide bandwidth at M >= 4096: median {statistics_median(fr):.2f}, min {fr[0]:.2f}, "
              f"max {fr[-1]:.2f} of the copy bandwidth (target {QUANT_BW_TARGET}).\n")
    presets = sorted({r["preset"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    sps = [s for s in ("2_4", "2_6", "2_8", "2_10", "2_inf") if any(r["variant"] == s for r in rows)]
    for p in presets:
        for dt in dtypes:
            ms = sorted({r["m"] for r in rows if r["preset"] == p and r["dtype"] == dt})
            if not ms:
                continue
            w(f"\n## {p}, {dt}: speedup over dense, summed over qkv/o/gate_up/down "
              f"(traced as vLLM runs it; eager; GEMM alone)\n\n")
            w("| M | dense traced ms | dense eager ms | " + " | ".join(sps) + " |\n|---|---|---|" + "---|" * len(sps) + "\n")
            t = _index(rows)
            layers = LAYERS
            for m in ms:
                try:
                    dl = sum(t[(p, ly, m, dt, "dense", "linear")]["ms"] for ly in layers)
                except KeyError:
                    continue
                dtr = summed_ms(rows, p, m, dt, "dense", "traced")
                cells = []
                for sp in sps:
                    tr, s, g = (summed_speedup(rows, p, m, dt, sp, x) for x in ("traced", "linear", "gemm"))
                    cells.append("; ".join("-" if v is None else f"{v:.2f}" for v in (tr, s, g)))
                w(f"| {m} | {'-' if dtr is None else f'{dtr:.3f}'} | {dl:.3f} | " + " | ".join(cells) + " |\n")
    return b.getvalue()


def summed_ms(rows, preset, m, dtype, variant, part):
    t = _index(rows)
    try:
        return sum(t[(preset, ly, m, dtype, variant, part)]["ms"] for ly in LAYERS)
    except KeyError:
        return None


def statistics_median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def plot_png(rows, path: Path, env: dict | None = None) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    presets = sorted({r["preset"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    sps = [s for s in ("2_4", "2_6", "2_8", "2_10", "2_inf") if any(r["variant"] == s for r in rows)]
    fig, axes = plt.subplots(len(presets), len(dtypes), figsize=(6 * len(dtypes), 4 * len(presets)), squeeze=False)
    for i, p in enumerate(presets):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            ms = sorted({r["m"] for r in rows if r["preset"] == p and r["dtype"] == dt})
            for sp in sps:
                for part, style in (("traced", "-"), ("linear", ":")):
                    ys = [summed_speedup(rows, p, m, dt, sp, part) for m in ms]
                    pts = [(m, y) for m, y in zip(ms, ys) if y is not None]
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", linestyle=style,
                                label=f"{sp} {'traced (vLLM)' if part == 'traced' else 'eager'}")
                gs = [summed_speedup(rows, p, m, dt, sp, "gemm") for m in ms]
                pts = [(m, y) for m, y in zip(ms, gs) if y is not None]
                if pts and sp in ("2_4", "2_8"):
                    ax.plot([a for a, _ in pts], [b for _, b in pts], linestyle="--", alpha=0.6, label=f"{sp} GEMM")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{p} {dt}: speedup over dense ({(env or {}).get('dense_kernel', {}).get(dt, 'dense')})")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("dense time / SlideSparse time")
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return True


def write_all(rows, env: dict, outdir: Path, stem: str = "kernel_bench", plot: bool = True) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    paths = []
    buf = io.StringIO()
    cw = csv.DictWriter(buf, fieldnames=list(dicts[0]))
    cw.writeheader()
    cw.writerows(dicts)
    p = outdir / f"{stem}.csv"
    atomic_write(p, buf.getvalue().encode())
    paths.append(p)
    summary = {"env": env, "targets": [], "quant_bandwidth": quant_bandwidth(dicts, env.get("copy_gbs", 1))}
    for preset, m, dt, sp, tgt, part in TARGETS:
        summary["targets"].append({"preset": preset, "m": m, "dtype": dt, "sparsity": sp, "target": tgt,
                                   "part": part, "speedup": summed_speedup(dicts, preset, m, dt, sp, part)})
    p = outdir / f"{stem}.json"
    atomic_write(p, json.dumps({"summary": summary, "rows": dicts}, indent=1).encode())
    paths.append(p)
    p = outdir / f"{stem}.md"
    atomic_write(p, markdown(dicts, env).encode())
    paths.append(p)
    p = outdir / f"{stem}.png"
    if plot and plot_png(dicts, p, env):
        paths.append(p)
    return paths


def load_rows(path: Path) -> tuple[list[dict], dict]:
    d = json.loads(Path(path).read_text())
    return d["rows"], d["summary"]["env"]


__all__ = ["write_all", "markdown", "summed_speedup", "quant_bandwidth", "load_rows", "TARGETS"]
