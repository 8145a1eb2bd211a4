"""What limits the sparse GEMM: sustained runs of each kernel with the GPU's SM clock and power
beside them (GPU host).

A kernel's speed is (peak work per SM-cycle) x (SM clock) x (the share of that peak it reaches
per cycle). The kernel comparison (tools/gpu_gemm_compare.py) measures only the product, in bursts
of a few ms; on the H200 the GPU-bound prefill points of the e2e sweep ran power-capped at
1605-1905 MHz (2026-12-03). This tool separates the factors: per kernel, one CUDA graph of a
preset's four layers (x R), replayed back to back for --seconds in interleaved rounds while
nvidia-smi samples the SM clock and power every 100 ms (slidesparse/bench/gpu_clocks.py), then

    rate          2 M N K / time (dense-equivalent TFLOP/s: the same work for every kernel)
    mma rate      2 M N K' / time (what the tensor cores run: K' = gamma K for a slid weight)
    SM clock      the samples' median over the run (first 20% left out: the clock settles)
    per-cycle     mma rate / (SMs x peak per SM-cycle x SM clock), with Hopper's peak per
                  SM-cycle for 8-bit MMA: 8192 dense (1979 TFLOP/s = 132 SMs x 8192 x 1830 MHz),
                  16384 with 2:4 sparsity (the datasheet's 3958)

Kernels: vLLM's CUTLASS dense (`cutlass_scaled_mm`, what users run; torch._scaled_mm for FP8 if vLLM
is missing, named in the output), SlideSparse's CUTLASS 2:4 kernel (per layer the fastest of its
cooperative configurations, chosen by a short timing first), its plain-epilogue twin where
compiled (acc -> bf16 only: the epilogue's share at sustained clocks), cuSPARSELt's GEMM alone.

    python tools/gpu_gemm_clocks.py --out results/H200/cutlass/clocks --preset qwen2.5-7b --m 16384

writes OUT.json (every run, its samples' summary, the command) and OUT.md (the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import gpu_gemm_compare as gcmp  # noqa: E402  (the operands and kernels of the kernel comparison)

from slidesparse.bench.gpu_clocks import ClockLog, reason_names, summarize, read, BENIGN  # noqa: E402

PEAK_PER_SM_CYCLE = {"dense": 8192, "sparse": 16384}   # 8-bit MMA flops per SM per cycle (Hopper)


def layer_sets(preset: str, m: int, dname: str, patterns: list[str], g) -> dict:
    """name -> {"fns": per-layer callables, "flops": 2MNK summed, "mma_flops": 2MNK' summed,
    "kind": dense|sparse, "configs": per-layer choice}; a kernel that cannot run is an error string."""
    from slidesparse.kernels import cutlass_sparse as cs
    pm = gcmp.pattern_mod()
    dtype = gcmp.DT[dname]
    shapes = gcmp.shapes(preset)
    sets: dict = {}

    def add(name, kind, layer_fn, flops, mma, config=None):
        s = sets.setdefault(name, {"fns": [], "flops": 0, "mma_flops": 0, "kind": kind, "configs": []})
        if isinstance(s, str):
            return
        if isinstance(layer_fn, Exception):
            sets[name] = f"{type(layer_fn).__name__}: {str(layer_fn).splitlines()[0][:200]}"
            return
        s["fns"].append(layer_fn)
        s["flops"] += flops
        s["mma_flops"] += mma
        s["configs"].append(config)

    for layer, (n, k) in shapes.items():
        s_tok = torch.rand(m, device="cuda", generator=g) * 1e-2 + 1e-3
        s_ch = torch.rand(n, device="cuda", generator=g) * 1e-2 + 1e-3
        bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        xq, wq = gcmp.rand8((m, k), dtype, g), gcmp.rand8((n, k), dtype, g)
        dense = gcmp.dense_variants(xq, wq, s_tok, s_ch, bias, dtype)
        pick = "vllm_cutlass" if callable(dense.get("vllm_cutlass")) else ("scaled_mm" if dtype == torch.float8_e4m3fn
                                                                            else "vllm_cutlass")
        add(f"dense {pick}", "dense", dense[pick], 2 * m * n * k, 2 * m * n * k)
        for pattern in patterns:
            pat = pm.parse_pattern(pattern)
            kp = -(-pat.lifted_k(k) // 64) * 64
            w_slid = gcmp.pruned_slid(n, k, pattern, dtype, g)
            w_slid = torch.nn.functional.pad(w_slid.view(torch.uint8), (0, kp - w_slid.shape[1])).view(dtype)
            xl = gcmp.rand8((m, kp), dtype, g)
            mma = 2 * m * n * kp
            ours = gcmp.ours_variants(xl, w_slid, s_tok, s_ch, bias, dtype,
                                      [c for c in cs.configs(dtype) if "_coop_" in c] if cs.available() else None)
            scaled = {c: f for c, f in ours.items() if c.startswith("ss:") and callable(f)}
            if scaled:
                t = gcmp.timed(scaled, reps=5, rounds=1)
                ok = {c: ms for c, (ms, err) in t.items() if ms is not None}
                best = min(ok, key=ok.get) if ok else None
                add(f"{pattern} slidesparse_cutlass", "sparse", scaled[best] if best else RuntimeError("no config ran"),
                    2 * m * n * k, mma, best and best[3:])
                plain = [c for c in ours if c.startswith("plain:")]
                twin = plain[0][6:].removesuffix("_plain") if plain else None
                if twin and f"ss:{twin}" in scaled:
                    # one configuration with both epilogues: the epilogue's share at sustained clocks
                    add(f"{pattern} slidesparse_cutlass {twin}", "sparse", scaled[f"ss:{twin}"], 2 * m * n * k, mma, twin)
                    add(f"{pattern} slidesparse_cutlass {twin} plain epilogue", "sparse", ours[plain[0]],
                        2 * m * n * k, mma, plain[0][6:])
            else:
                add(f"{pattern} slidesparse_cutlass", "sparse", ours.get("slidesparse_cutlass",
                                                                         RuntimeError("not built")), 0, 0)
            cslt = gcmp.cslt_variants(xl, w_slid, s_tok, s_ch, bias, "cusparselt")
            add(f"{pattern} cusparselt gemm only", "sparse", cslt["cusparselt_gemm_only"], 2 * m * n * k, mma)
    return sets


def sustained(fns: list, seconds: float, target_replay_s: float = 0.05) -> tuple[float, list[float], int]:
    """Replays of one CUDA graph of the layer set (x reps) for about `seconds`: (ms per set, the
    wall-clock window [start, end], sets run)."""
    def once():
        for f in fns:
            f()
    once()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    once()
    b.record()
    b.synchronize()
    reps = max(1, int(target_replay_s * 1e3 / max(a.elapsed_time(b), 1e-3)))
    graph = gcmp.capture(once, reps)
    n = max(1, int(seconds / target_replay_s))
    t0 = time.time()
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    b.synchronize()
    t1 = time.time()
    del graph
    torch.cuda.empty_cache()
    return a.elapsed_time(b) / (n * reps), [t0, t1], n * reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md)")
    ap.add_argument("--preset", default="qwen2.5-7b")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--dtypes", default="fp8,int8")
    ap.add_argument("--patterns", default="2_4,2_8")
    ap.add_argument("--seconds", type=float, default=2.0, help="per kernel and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # suffixes appended, not swapped: a name such as clocks_qwen2.5-7b has a dot of its own
    clock_path = Path(f"{out}.clocks.csv")
    log = ClockLog.start(clock_path)
    if log is None:
        print("error: nvidia-smi cannot sample this GPU's clocks", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    g = torch.Generator(device="cuda").manual_seed(1234)
    runs = []
    try:
        time.sleep(1.0)      # the sampler's first lines
        for dname in args.dtypes.split(","):
            sets = layer_sets(args.preset, args.m, dname, args.patterns.split(","), g)
            for name, s in sets.items():
                if isinstance(s, str):
                    runs.append({"dtype": dname, "kernel": name, "error": s})
                    print(f"{dname} {name}: not measured: {s}", flush=True)
            live = {k: v for k, v in sets.items() if not isinstance(v, str)}
            for r in range(args.rounds):
                for name, s in live.items():
                    ms, window, n = sustained(s["fns"], args.seconds)
                    runs.append({"dtype": dname, "kernel": name, "kind": s["kind"], "round": r, "ms": ms,
                                 "window": window, "sets": n, "flops": s["flops"], "mma_flops": s["mma_flops"],
                                 "configs": s["configs"]})
                    print(f"{dname} {name} round {r}: {ms:.4f} ms per set", flush=True)
                    time.sleep(0.3)
            del sets, live
            torch.cuda.empty_cache()
        time.sleep(0.5)
    finally:
        log.stop()
    samples = read(clock_path)
    for r in runs:
        if "window" in r:
            t0, t1 = r["window"]
            r["clocks"] = summarize(samples, [[t0 + 0.2 * (t1 - t0), t1]])[0]
    meta = {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count, "torch": torch.__version__,
            "host": platform.node(), "command": "python " + shlex.join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "preset": args.preset, "m": args.m}
    rows = table(runs, meta["sms"])
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "runs": runs, "rows": rows}, indent=1))
    md = render(rows, runs, meta)
    Path(f"{out}.md").write_text(md)
    print(md)
    return 0


def table(runs: list[dict], sms: int) -> list[dict]:
    """Per (dtype, kernel): medians over the rounds."""
    by: dict = {}
    for r in runs:
        if "ms" in r:
            by.setdefault((r["dtype"], r["kernel"]), []).append(r)
    rows = []
    for (dname, kernel), rs in by.items():
        ms = statistics.median(r["ms"] for r in rs)
        clocks = [r["clocks"] for r in rs if r.get("clocks")]
        mhz = statistics.median(c["sm_mhz"][1] for c in clocks) if clocks else None
        power = [c["power_w"] for c in clocks if c.get("power_w") is not None]
        bits = 0
        for c in clocks:
            bits |= c["reasons"]
        rate, mma = rs[0]["flops"] / ms / 1e9, rs[0]["mma_flops"] / ms / 1e9
        peak = PEAK_PER_SM_CYCLE[rs[0]["kind"]]
        rows.append({"dtype": dname, "kernel": kernel, "kind": rs[0]["kind"], "ms": ms,
                     "ms_rounds": [r["ms"] for r in rs], "tflops": rate, "mma_tflops": mma, "sm_mhz": mhz,
                     "power_w": statistics.median(power) if power else None,
                     "events": reason_names(bits & ~BENIGN),
                     "per_cycle": (mma * 1e12 / (sms * peak * mhz * 1e6)) if mhz else None,
                     "configs": rs[0]["configs"]})
    return rows


def render(rows: list[dict], runs: list[dict], meta: dict) -> str:
    lines = [f"# Sustained GEMMs with the GPU's clock: {meta['preset']}, M={meta['m']}, four layers", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['device']}, {meta['sms']} SMs, torch {meta['torch']}, {meta['time']}. Each kernel: one CUDA graph of the "
             "four layers replayed back to back for the run's seconds, rounds interleaved; medians over rounds. "
             "rate = 2MNK / time (the same work for every kernel); MMA rate = 2MNK' / time; per-cycle = MMA rate / "
             "(SMs x peak per SM-cycle x median SM clock), peak 8192 (dense 8-bit) or 16384 (2:4 sparse) flops.", ""]
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dname]
        dense = next((r for r in mine if r["kind"] == "dense"), None)
        lines += [f"## {dname}", "", "| kernel | ms per set | speed-up | rate TFLOP/s | MMA rate TFLOP/s | SM MHz | power W | "
                  "per-cycle of peak | clock events |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in mine:
            su = f"{dense['ms'] / r['ms']:.3f}x" if dense else "-"
            f = lambda v, s: "-" if v is None else s.format(v)  # noqa: E731
            lines.append(f"| {r['kernel']} | {r['ms']:.3f} | {su} | {r['tflops']:.0f} | {r['mma_tflops']:.0f} | "
                         f"{f(r['sm_mhz'], '{:.0f}')} | {f(r['power_w'], '{:.0f}')} | {f(r['per_cycle'], '{:.1%}')} | "
                         f"{', '.join(r['events']) or '-'} |")
        lines.append("")
    errors = [r for r in runs if "error" in r]
    if errors:
        lines += ["## Not measured", ""] + [f"- {r['dtype']} {r['kernel']}: {r['error']}" for r in errors] + [""]
    configs = [(r["dtype"], r["kernel"], r["configs"]) for r in rows if r["kind"] == "sparse" and any(r["configs"])]
    if configs:
        lines += ["## SlideSparse configurations (qkv, o, gate_up, down)", ""]
        lines += [f"- {d} {k}: {', '.join(str(c) for c in cs)}" for d, k, cs in configs] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
