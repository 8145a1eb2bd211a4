"""Kernel comparison of the quantized linear's GEMM with its epilogue (scales, bias, bf16 out), on
real layer shapes (GPU host).

Variants, each timed where it is available in this process (a missing one is recorded with the
reason, never silently dropped):
  dense   torch._scaled_mm FP8 (row-wise scales, bias, fast accumulation: vLLM's mode);
          vLLM's CUTLASS dense (vllm._custom_ops.cutlass_scaled_mm, FP8 and INT8) when importable;
          INT8: the project's Triton INT8 GEMM (dequant fused) and torch._int_mm (GEMM only)
  sparse  cuSPARSELt through torch (torch._cslt_sparse_mm, searched algorithm; GEMM alone and
          GEMM + the project's dequant pass); with --cslt010 LIB the same again in a child process
          that LD_PRELOADs that libcusparseLt (0.10); torchao's CUTLASS 2:4 FP8 kernel when
          torchao imports; SlideSparse's CUTLASS kernel (slidesparse/kernels/cutlass_sparse.py),
          every compiled configuration and mode (the best is what the tuner would store)

Sparse weights are pruned to the pattern, quantized and slid (K' = gamma K); the lifted operand
is random 8-bit data of width K' (its contents do not change a GEMM's time). Dense variants run
the unpruned K. Timing: a CUDA graph of --reps back-to-back calls per variant, replayed in
--rounds interleaved rounds, median per call.

    python tools/gpu_gemm_compare.py --out results/H200/cutlass/compare \
        --presets qwen2.5-7b,llama3.2-1b --m 64,256,1024,4096,16384 --patterns 2_4,2_8 --dtypes fp8,int8

writes OUT.json (every row, the command, versions) and OUT.md (sums over each preset's layers).

    python tools/gpu_gemm_compare.py --merge A.json B.json ... --out results/H200/cutlass/summary

(no GPU needed) writes one cross table of several runs: per preset, dtype and M, the four layers'
summed times of the dense baseline, ours, and cuSPARSELt with and without the dequant pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FALLBACK_SHAPES = {
    "llama3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)},
    "qwen2.5-7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
}
DT = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def shapes(preset):
    try:
        from slidesparse.bench.shapes import linear_shapes
        return linear_shapes(preset)
    except Exception:  # noqa: BLE001 - the bench package may be mid-restructuring
        return FALLBACK_SHAPES[preset]


def pattern_mod():
    try:
        from slidesparse.core import pattern
    except ImportError:
        from slidesparse import pattern
    return pattern


def rand8(shape, dtype, g):
    """Random 8-bit operand without -0.0 or NaN codes."""
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, device="cuda", generator=g, dtype=torch.int8)
    t = (torch.randn(shape, device="cuda", generator=g) * 64).clamp(-448, 448).to(dtype).view(torch.uint8)
    t[t == 0x80] = 0  # -0.0 would count as a non-zero in the bit-level slide
    return t.view(dtype)


def pruned_slid(n, k, pattern, dtype, g):
    pm = pattern_mod()
    pat = pm.parse_pattern(pattern)
    w = rand8((n, pat.padded_k(k)), dtype, g).view(torch.uint8)
    if pat.L is not None:
        grp = w.view(n, -1, pat.group)
        drop = torch.rand(grp.shape, device="cuda", generator=g).argsort(-1)[..., :2]
        grp.scatter_(-1, drop, 0)
    return pm.slide(w[:, :k].contiguous(), pat).view(dtype)


def capture(fn, reps: int) -> "torch.cuda.CUDAGraph":
    """One CUDA graph of `reps` back-to-back calls of fn, replayed once. fn is warmed up first
    (Triton autotune, cuSPARSELt plan, module load) outside the capture, also on a side stream."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def timed(fns: dict, reps: int, rounds: int) -> dict:
    """name -> callable; returns name -> (median ms per call, None) or (None, error)."""
    graphs, res = {}, {}
    for name, fn in fns.items():
        try:
            graphs[name] = capture(fn, reps)
        except Exception as e:  # noqa: BLE001 - recorded per variant
            res[name] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) / reps)
    for name, ts in times.items():
        res[name] = (statistics.median(ts), None)
    del graphs
    return res


def dense_variants(xq, wq, s_tok, s_ch, bias, dtype):
    out = {}
    if dtype == torch.float8_e4m3fn:
        wt = wq.t()
        out["scaled_mm"] = lambda: torch._scaled_mm(xq, wt, scale_a=s_tok[:, None], scale_b=s_ch[None, :],
                                                    bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)
    else:
        try:
            from slidesparse.kernels.int8_gemm import int8_linear
            out["triton_int8"] = lambda: int8_linear(xq, wq, s_tok, s_ch, bias, torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            out["triton_int8"] = e
        wt = wq.t()
        out["int_mm_gemm_only"] = lambda: torch._int_mm(xq, wt)
    try:
        from vllm import _custom_ops as vops
        wt = wq.t()
        out["vllm_cutlass"] = lambda: vops.cutlass_scaled_mm(xq, wt, scale_a=s_tok[:, None], scale_b=s_ch[:, None],
                                                             out_dtype=torch.bfloat16, bias=bias)
    except Exception as e:  # noqa: BLE001
        out["vllm_cutlass"] = e
    return out


def cslt_variants(xl, w_slid, s_tok, s_ch, bias, label):
    out = {}
    try:
        wc = torch._cslt_compress(w_slid)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alg = int(torch._cslt_sparse_mm_search(wc, xl.t(), out_dtype=torch.bfloat16, transpose_result=True))
        gemm = lambda: torch._cslt_sparse_mm(wc, xl.t(), out_dtype=torch.bfloat16,  # noqa: E731
                                             transpose_result=True, alg_id=alg)
        out[f"{label}_gemm_only"] = gemm
        try:
            from slidesparse.kernels.dequant import dequant
            out[f"{label}+dequant"] = lambda: dequant(gemm(), s_tok, s_ch, bias, torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            out[f"{label}+dequant"] = e
    except Exception as e:  # noqa: BLE001
        out[f"{label}_gemm_only"] = e
    return out


def torchao_variant(xl, w_slid, s_tok, s_ch, bias):
    try:
        import torchao  # noqa: F401
        from torchao.ops import rowwise_scaled_linear_sparse_cutlass_f8f8, to_sparse_semi_structured_cutlass_sm9x_f8
        # the compressor torchao's own Float8 2:4 tensor uses (Sparse2x4 from_hp): the 2:4 FP8 weight
        # in its dense layout -> (values [N, K'/2], metadata)
        wv, wm = to_sparse_semi_structured_cutlass_sm9x_f8(w_slid.contiguous())
        return {"torchao_cutlass": lambda: rowwise_scaled_linear_sparse_cutlass_f8f8(
            xl, s_tok.float(), wv, wm, s_ch.float(), bias, torch.bfloat16)}
    except Exception as e:  # noqa: BLE001
        return {"torchao_cutlass": e}


def ours_variants(xl, w_slid, s_tok, s_ch, bias, dtype, configs):
    from slidesparse.kernels import cutlass_sparse as cs
    if not cs.available():
        return {"slidesparse_cutlass": RuntimeError(cs.why_unavailable())}
    w = cs.compress(w_slid, k=xl.shape[1])
    names = configs or cs.configs(dtype)
    out = {f"ss:{c}": (lambda c=c: cs.scaled_sparse_mm(xl, w, s_tok, s_ch, bias, config=c)) for c in names}
    # the epilogue's share: a plain-epilogue twin of a configuration (acc -> bf16 only), where compiled
    for plain in cs.plain_configs():
        twin = plain.removesuffix("_plain")
        if cs.config_info(plain)["in_dtype"] == cs.config_info(twin)["in_dtype"] and twin in names:
            out[f"plain:{plain}"] = lambda p=plain: cs.unscaled_mm_for_measurement(xl, w, p)
    return out


def run_problems(args) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1234)
    only = set(args.only.split(",")) if args.only else None
    pm = pattern_mod()
    for preset in args.presets.split(","):
        for layer, (n, k) in shapes(preset).items():
            for dname in args.dtypes.split(","):
                dtype = DT[dname]
                for m in [int(v) for v in args.m.split(",")]:
                    s_tok = torch.rand(m, device="cuda", generator=g) * 1e-2 + 1e-3
                    s_ch = torch.rand(n, device="cuda", generator=g) * 1e-2 + 1e-3
                    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
                    base = dict(preset=preset, layer=layer, n=n, k=k, m=m, dtype=dname)
                    if only is None or "dense" in only:
                        xq, wq = rand8((m, k), dtype, g), rand8((n, k), dtype, g)
                        fns = dense_variants(xq, wq, s_tok, s_ch, bias, dtype)
                        rows += collect(fns, base | dict(pattern="dense", kp=k), args)
                        del xq, wq
                    for pattern in args.patterns.split(","):
                        pat = pm.parse_pattern(pattern)
                        kp = -(-pat.lifted_k(k) // 64) * 64
                        w_slid = pruned_slid(n, k, pattern, dtype, g)
                        w_slid = torch.nn.functional.pad(w_slid.view(torch.uint8), (0, kp - w_slid.shape[1])).view(dtype)
                        xl = rand8((m, kp), dtype, g)
                        fns = {}
                        if only is None or "cusparselt" in only:
                            fns |= cslt_variants(xl, w_slid, s_tok, s_ch, bias, args.cslt_label)
                        if (only is None or "torchao" in only) and dtype == torch.float8_e4m3fn:
                            fns |= torchao_variant(xl, w_slid, s_tok, s_ch, bias)
                        if only is None or "ours" in only:
                            fns |= ours_variants(xl, w_slid, s_tok, s_ch, bias, dtype, args.configs)
                        rows += collect(fns, base | dict(pattern=pattern, kp=kp), args)
                        del w_slid, xl
                    print(f"{preset} {layer} {dname} M={m} done", flush=True)
                    if args.partial:
                        # what is measured so far survives a run cut short by the machine's limit
                        tmp = Path(args.partial + ".tmp")
                        tmp.write_text(json.dumps(dict(command=args.cmd, rows=rows)))
                        tmp.replace(args.partial)
                torch.cuda.empty_cache()
    return rows


def collect(fns, base, args):
    ok = {k: v for k, v in fns.items() if callable(v)}
    rows = [dict(base, variant=k, ms=None, error=f"{type(v).__name__}: {str(v).splitlines()[0][:200]}")
            for k, v in fns.items() if not callable(v)]
    for name, (ms, err) in timed(ok, args.reps, args.rounds).items():
        tflops = None if ms is None else 2 * base["m"] * base["n"] * base["k"] / ms / 1e9
        rows.append(dict(base, variant=name, ms=ms, error=err, dense_equiv_tflops=tflops))
    return rows


def best_ours(rows):
    """For each problem keep the fastest of our configurations as variant 'slidesparse_cutlass'."""
    out, best = [], {}
    for r in rows:
        if r["variant"].startswith("ss:"):
            key = tuple(r[k] for k in ("preset", "layer", "n", "k", "m", "dtype", "pattern"))
            if r["ms"] is not None and (key not in best or r["ms"] < best[key]["ms"]):
                best[key] = dict(r, variant="slidesparse_cutlass", config=r["variant"][3:])
        out.append(r)
    return out + list(best.values())


def layer_sums(rows) -> dict:
    """(preset, dtype, m) -> {(pattern, variant): ms summed over the preset's four layers}, for the
    variants measured on all four (our per-configuration rows left out)."""
    sums: dict = {}
    for r in rows:
        if r["ms"] is None or r["variant"].startswith(("ss:", "plain:")):
            continue
        sums.setdefault((r["preset"], r["dtype"], r["m"], r["pattern"], r["variant"]), []).append(r["ms"])
    out: dict = {}
    for (preset, dt, m, pattern, variant), v in sums.items():
        if len(v) == 4:
            out.setdefault((preset, dt, m), {})[(pattern, variant)] = sum(v)
    return out


def dense_reference(d: dict) -> str | None:
    """The dense variant ratios are taken against: vLLM's CUTLASS dense, else the fastest dense one."""
    dense = {v: ms for (p, v), ms in d.items() if p == "dense" and not v.endswith("gemm_only")}
    return "vllm_cutlass" if "vllm_cutlass" in dense else (min(dense, key=dense.get) if dense else None)


def summarize(rows, cmd, meta) -> str:
    lines = ["# GEMM + epilogue comparison (scales, bias, bf16 out)", "", f"Command: `{cmd}`", "",
             f"Device: {meta['device']}; torch {meta['torch']}; cuSPARSELt {meta['cusparselt']}; "
             f"library: {meta.get('cutlass_build', '-')}", "",
             "Times are ms per call, median of CUDA-graph replays, summed over the preset's four layers.",
             "`ss` = SlideSparse CUTLASS (best compiled configuration per layer); `_gemm_only` rows have no",
             "epilogue (not comparable with the targets).", ""]
    for (preset, dt, m), d in sorted(layer_sums(rows).items()):
        ref_name = dense_reference(d)
        lines.append(f"## {preset} {dt} M={m}" + (f" (speed-up vs {ref_name})" if ref_name else ""))
        lines += ["", "| pattern | variant | ms | speed-up |", "|---|---|---|---|"]
        for (p, v), ms in sorted(d.items()):
            su = f"{d[('dense', ref_name)] / ms:.3f}x" if ref_name else "-"
            lines.append(f"| {p} | {v} | {ms:.4f} | {su} |")
        lines.append("")
    lines += ["## Best SlideSparse configuration per layer (what the tuner would store)", "",
              "| preset | layer | dtype | pattern | M | config | ms | TFLOP/s (dense-equivalent 2MNK) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["variant"] == "slidesparse_cutlass" and r["ms"] is not None),
                    key=lambda r: (r["preset"], r["dtype"], r["pattern"], r["m"], r["layer"])):
        lines.append(f"| {r['preset']} | {r['layer']} | {r['dtype']} | {r['pattern']} | {r['m']} | {r['config']} | "
                     f"{r['ms']:.4f} | {r['dense_equiv_tflops']:.0f} |")
    lines.append("")
    key = lambda r: (r["preset"], r["layer"], r["dtype"], r["pattern"], r["m"])  # noqa: E731
    scaled = {(key(r), r["variant"][3:]): r["ms"] for r in rows if r["variant"].startswith("ss:") and r["ms"]}
    plain = [r for r in rows if r["variant"].startswith("plain:") and r["ms"]]
    if plain:
        lines += ["## The epilogue's share (same configuration with the plain epilogue: acc -> bf16 only)", "",
                  "| preset | layer | dtype | pattern | M | config | scaled ms | plain ms | epilogue share |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(plain, key=key):
            twin = r["variant"][6:].removesuffix("_plain")
            t = scaled.get((key(r), twin))
            if t:
                lines.append(f"| {r['preset']} | {r['layer']} | {r['dtype']} | {r['pattern']} | {r['m']} | {twin} | "
                             f"{t:.4f} | {r['ms']:.4f} | {(t - r['ms']) / t:.1%} |")
        lines.append("")
    missing = sorted({(r["variant"], r["error"]) for r in rows if r["ms"] is None})
    if missing:
        lines += ["## Not measured", ""] + [f"- {v}: {e}" for v, e in missing] + [""]
    return "\n".join(lines)


def merge(paths, out, labels=None):
    """One cross table of several runs. Every ratio is against vLLM's CUTLASS dense (else the best
    dense kernel) of the run the variant was measured in; a run without a dense column for a cell
    (e.g. `--only cusparselt`) is measured against the dense of the latest run before it that has
    one (give the runs in the order they ran, in one session). A variant measured in several runs
    is taken from the last of them. labels: {old variant name: new}, applied before anything else
    (a run's name for a variant can be wrong, e.g. a library that misreports its version)."""
    labels = labels or {}
    table: dict = {}   # (preset, dtype, m) -> {(pattern, variant): (ms, dense ms of that run)}
    last_dense: dict = {}   # (preset, dtype, m) -> the latest run's dense reference ms
    cmds = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        cmds.append(d["command"])
        rows = [dict(r, variant=labels.get(r["variant"], r["variant"])) for r in d["rows"]]
        for key, dd in layer_sums(rows).items():
            ref = dense_reference(dd)
            if ref:
                last_dense[key] = dd[("dense", ref)]
            for pv, ms in dd.items():
                table.setdefault(key, {})[pv] = (ms, last_dense.get(key))
    names = sorted({v for d in table.values() for (pt, v) in d if pt != "dense"})
    cslt = [v for v in names if v.startswith("cusparselt") and not v.endswith("_gemm_only")]
    sparse_cols = cslt + [v for v in ("torchao_cutlass", "slidesparse_cutlass") if v in names]
    label = {"torchao_cutlass": "torchao 0.18 CUTLASS", "slidesparse_cutlass": "ours (CUTLASS)"}
    label |= {c: c.replace("cusparselt_", "cuSPARSELt ") for c in cslt}
    patterns = sorted({pt for d in table.values() for (pt, _) in d if pt != "dense"})
    head = ["preset", "dtype", "M", "vLLM CUTLASS dense ms", "torch._scaled_mm / Triton INT8"]
    head += [f"{pt} {label[c]}" for pt in patterns for c in sparse_cols]
    lines = ["# Sparse GEMMs with their epilogue against vLLM's dense GEMM (H200), four layers summed", "",
             "ms per call (median of CUDA-graph replays) summed over the preset's four linear layers, GEMM with",
             "its epilogue (per-token x per-channel scales, bias, bf16 out); cuSPARSELt includes the project's",
             "dequant pass (it has no per-token scale in its epilogue). In brackets: speed-up over vLLM's CUTLASS",
             "dense (`vllm._custom_ops.cutlass_scaled_mm`, what stock vLLM runs) measured in the same run as the",
             "cell. torchao's kernel is FP8 only. Sparse operands: K' = gamma K (2_4: K, 2_8: 1.5 K).", "",
             "Runs merged (in this order; a run without a dense column is measured against the dense of",
             "the run before it):", ""] + [f"- `{c}`" for c in cmds] + (
             [f"- relabelled: {', '.join(f'`{a}` as `{b}`' for a, b in labels.items())}"] if labels else []) + ["",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v):
        if v is None:
            return "-"
        ms, dense = v
        return f"{ms:.4f}" + (f" ({dense / ms:.3f}x)" if dense else "")

    for (preset, dt, m), d in sorted(table.items()):
        vl = d.get(("dense", "vllm_cutlass"))
        other = d.get(("dense", "scaled_mm")) or d.get(("dense", "triton_int8"))
        row = [preset, dt, str(m), "-" if vl is None else f"{vl[0]:.4f}", cell(other)]
        row += [cell(d.get((pt, c))) for pt in patterns for c in sparse_cols]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    Path(out).with_suffix(".md").write_text(text)
    Path(out).with_suffix(".json").write_text(json.dumps(
        dict(commands=cmds, table=[dict(preset=k[0], dtype=k[1], m=k[2], pattern=pv[0], variant=pv[1], ms=v[0],
                                        dense_ms_same_run=v[1]) for k, d in sorted(table.items())
                                   for pv, v in sorted(d.items())]), indent=1))
    print(text)


def main():
    if "--merge" in sys.argv:
        mp = argparse.ArgumentParser(description="merge runs into one cross table (no GPU)")
        mp.add_argument("--merge", nargs="+", required=True, metavar="RUN.json", help="runs, in the order they ran")
        mp.add_argument("--out", required=True, help="output path without extension (writes .json and .md)")
        mp.add_argument("--label", action="append", default=[], metavar="OLD=NEW", help="rename a variant")
        ma = mp.parse_args()
        bad = [x for x in ma.label if x.count("=") != 1 or not all(x.split("="))]
        if bad:
            mp.error(f"--label takes OLD=NEW, got {bad[0]!r}")
        return merge(ma.merge, ma.out, dict(x.split("=") for x in ma.label))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output path without extension (writes .json and .md)")
    ap.add_argument("--presets", default="qwen2.5-7b")
    ap.add_argument("--m", default="256,16384")
    ap.add_argument("--patterns", default="2_4,2_8")
    ap.add_argument("--dtypes", default="fp8,int8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=None, help="comma list of our configurations (default: all compiled)")
    ap.add_argument("--only", default=None, help="comma list of dense,cusparselt,torchao,ours")
    ap.add_argument("--cslt010", default=None, help="libcusparseLt.so.0 of 0.10: also time cuSPARSELt with it")
    ap.add_argument("--cslt-label", default="cusparselt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.configs:
        args.configs = args.configs.split(",")
    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    args.cmd = cmd
    args.partial = args.out + ".partial.json"
    Path(args.partial).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        from slidesparse.kernels import cslt_plan
        cslt_ver, cslt_name = cslt_plan.loaded_version(), cslt_plan.loaded_version_name()
    except Exception:  # noqa: BLE001
        cslt_ver = cslt_name = None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cusparselt=cslt_ver or torch.backends.cusparselt.version())
    try:
        from slidesparse.kernels import cutlass_sparse as cs
        meta["cutlass_build"] = cs.build_info() if cs.available() else cs.why_unavailable()
    except Exception as e:  # noqa: BLE001
        meta["cutlass_build"] = str(e)
    if args.cslt_label == "cusparselt" and cslt_name:
        args.cslt_label = f"cusparselt_{cslt_name}"
    rows = run_problems(args)
    if args.cslt010:
        child = Path(args.out + "_cslt010")
        env = dict(os.environ, LD_PRELOAD=args.cslt010)
        r = subprocess.run([sys.executable, __file__, "--out", str(child), "--presets", args.presets, "--m", args.m,
                            "--patterns", args.patterns, "--dtypes", args.dtypes, "--reps", str(args.reps),
                            "--rounds", str(args.rounds), "--only", "cusparselt"], env=env)
        if r.returncode == 0:
            rows += [x for x in json.loads(child.with_suffix(".json").read_text())["rows"]]
        else:
            rows.append(dict(variant="cusparselt_0.10", ms=None, error=f"child run failed ({r.returncode})"))
    rows = best_ours(rows)
    meta["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=cmd, meta=meta, rows=rows), indent=1))
    Path(args.partial).unlink(missing_ok=True)
    md = summarize(rows, cmd, meta)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
