"""Kernel benchmark: dense vs SlideSparse GEMM and whole linear, per preset shape, M and dtype.

Every variant of one (shape, M, dtype) is timed in the same process, interleaved over rounds
(the median of rounds is kept), each timing being CUDA-graph replays of back-to-back calls, so
launch gaps and host overhead are out of the numbers for dense and sparse alike.

Baselines: FP8 dense = Triton per-token quant + torch._scaled_mm with row-wise scales and bf16
output (dequant fused in its epilogue: what vLLM runs). INT8 dense = Triton per-token quant + the
faster of the Triton INT8 GEMM (dequant fused) and torch._int_mm + our dequant kernel.
SlideSparse = Triton quant+slide + cuSPARSELt 2:4 GEMM (bf16 output) + Triton dequant.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..core.pattern import parse_pattern, slide
from ..core.prune import prune_magnitude
from ..core.quant import DTYPES, quantize_weight
from .shapes import linear_shapes

SPARSITIES = ("2_4", "2_6", "2_8", "2_10", "2_inf")
DEFAULT_MS = (16, 64, 256, 1024, 4096, 16384, 65536)


def graph_time_ms(fn, target_ms: float = 4.0, replays: int = 5) -> float:
    """Median device time of one fn() call, from CUDA-graph replays of r back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    r = int(min(max(target_ms / est, 1), 200))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for _ in range(r):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / r)
    del g
    return statistics.median(ts)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written), the quant+slide target's yardstick:
    the best of torch's copy kernel over element sizes, and of cudaMemcpy (a 1-D copy)."""
    best = 0.0
    for dt in (torch.uint8, torch.float32, torch.int64):
        a = torch.ones(nbytes // torch.tensor([], dtype=dt).element_size(), dtype=dt, device="cuda")
        b = torch.empty_like(a)
        best = max(best, 2 * nbytes / (graph_time_ms(lambda: b.copy_(a), target_ms=20) * 1e-3) / 1e9)
        a = b = None  # free both before the next dtype
    return best


def pruned_slid_weight(n: int, k: int, sparsity: str, wdtype: str, gen: torch.Generator):
    """Random weight pruned to Z_L (the converter's magnitude rule), quantized, slid: (slid, scale)."""
    pat = parse_pattern(sparsity)
    w = prune_magnitude(torch.randn(n, k, device="cuda", generator=gen), pat).contiguous()
    q, scale = quantize_weight(w, wdtype)
    del w
    ws = slide(q.float(), pat).to(q.dtype)
    return ws, scale


@dataclass
class Row:
    preset: str
    layer: str
    n: int
    k: int
    m: int
    dtype: str
    variant: str      # dense | 2_4 | ...
    part: str         # gemm | linear | quant | dequant
    ms: float
    impl: str = ""
    k_lifted: int = 0
    alg_id: int = 0


def prepare_layer(n, k, dtype, sparsities, gen):
    """Weights of one (shape, dtype), made once and reused for every M: dense codes + per-sparsity
    compressed 2:4 weights."""
    from ..kernels import cusparselt as cl
    wq, wscale = quantize_weight(torch.randn(n, k, device="cuda", generator=gen), dtype)
    sparse = {}
    for sp in sparsities:
        ws, sc = pruned_slid_weight(n, k, sp, dtype, gen)
        sparse[sp] = (cl.compress(ws), sc.contiguous())
        del ws
    return {"wq": wq, "wscale": wscale.contiguous(), "sparse": sparse}


def bench_config(preset, layer, n, k, m, dtype, prepared, rounds, gen, search_min_m, log, reuse=None):
    from ..kernels import cusparselt as cl
    from ..kernels.dequant import dequant
    from ..kernels.int8_gemm import int8_linear
    from ..kernels.quant_slide import quant_only, quant_slide

    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    wq, wscale = prepared["wq"], prepared["wscale"]
    variants: dict[tuple[str, str], tuple] = {}
    qd, sd = quant_only(x, dtype)
    if dtype == "fp8_e4m3":
        wt = wq.t()
        gemm = lambda: torch._scaled_mm(qd, wt, scale_a=sd.view(-1, 1), scale_b=wscale.view(1, -1),  # noqa: E731
                                        out_dtype=torch.bfloat16)
        variants[("dense", "gemm")] = (gemm, "scaled_mm")

        def dense_linear():
            q, s = quant_only(x, dtype)
            return torch._scaled_mm(q, wt, scale_a=s.view(-1, 1), scale_b=wscale.view(1, -1), out_dtype=torch.bfloat16)
        variants[("dense", "linear")] = (dense_linear, "quant+scaled_mm")
    else:
        variants[("dense", "gemm:triton")] = (lambda: int8_linear(qd, wq, sd, wscale, None, torch.bfloat16), "triton_int8")
        wt = wq.t()

        def tri_linear():
            q, s = quant_only(x, dtype)
            return int8_linear(q, wq, s, wscale, None, torch.bfloat16)
        variants[("dense", "linear:triton")] = (tri_linear, "quant+triton_int8")
        if m > 16:
            variants[("dense", "gemm:int_mm")] = (lambda: torch._int_mm(qd, wt), "int_mm")

            def intmm_linear():
                q, s = quant_only(x, dtype)
                return dequant(torch._int_mm(q, wt), s, wscale, None, torch.bfloat16)
            variants[("dense", "linear:int_mm")] = (intmm_linear, "quant+int_mm+dequant")
    variants[("dense", "quant")] = (lambda: quant_only(x, dtype), "triton")

    meta = {}
    acc_dt = cl.acc_dtype_for(DTYPES[dtype])
    for sp, (wc, sc) in prepared["sparse"].items():
        pat = parse_pattern(sp)
        xq, st = quant_slide(x, pat, dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
        alg = 0
        if reuse and reuse.get(sp) is not None:
            alg = reuse[sp]
        elif m >= search_min_m:
            try:
                alg = cl.search_alg(wc, xq, acc_dt)
            except RuntimeError as e:  # keep the default; say so in the log
                log(f"  search failed for {layer} {sp} M={m}: {str(e).splitlines()[0]}")
        meta[sp] = (pat.lifted_k(k), alg)
        acc = cl.sparse_mm(wc, xq, acc_dt, alg_id=alg)
        variants[(sp, "gemm")] = ((lambda wc=wc, xq=xq, alg=alg: cl.sparse_mm(wc, xq, acc_dt, alg_id=alg)), "cusparselt")
        variants[(sp, "quant")] = ((lambda pat=pat: quant_slide(x, pat, dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)), "triton")
        variants[(sp, "dequant")] = ((lambda acc=acc, st=st, sc=sc: dequant(acc, st, sc, None, torch.bfloat16, m=m, n=n)), "triton")

        def sparse_linear(wc=wc, pat=pat, sc=sc, alg=alg):
            q, s = quant_slide(x, pat, dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
            a = cl.sparse_mm(wc, q, acc_dt, alg_id=alg)
            return dequant(a, s, sc, None, torch.bfloat16, m=m, n=n)
        variants[(sp, "linear")] = (sparse_linear, "quant_slide+cusparselt+dequant")

    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    keys = list(variants)
    failed = set()
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate so no variant always goes first
        for key in order:
            if key in failed:
                continue
            try:
                times[key].append(graph_time_ms(variants[key][0]))
            except RuntimeError as e:  # one broken variant must not sink the run: log it, drop it
                failed.add(key)
                log(f"  {preset} {layer} M={m} {dtype} {key}: {str(e).splitlines()[0][:160]}")
    rows = []
    for (variant, part), ts in times.items():
        if not ts:
            continue
        kl, alg = meta.get(variant, (k, 0))
        rows.append(Row(preset, layer, n, k, m, dtype, variant, part, statistics.median(ts),
                        variants[(variant, part)][1], kl, alg))
    # the INT8 baseline is the faster dense candidate, per part
    if dtype == "int8":
        for part in ("gemm", "linear"):
            cands = [rw for rw in rows if rw.variant == "dense" and rw.part.startswith(part + ":")]
            if not cands:
                continue
            best = min(cands, key=lambda rw: rw.ms)
            rows.append(Row(preset, layer, n, k, m, dtype, "dense", part, best.ms, best.impl, k, 0))
    return rows


def _m_order(ms):
    """The headline M (16384) first, the most expensive (> 16384) last: an interrupted run keeps
    what matters most."""
    ms = sorted(ms)
    head = [m for m in ms if m == 16384]
    return head + [m for m in reversed(ms) if m < 16384] + [m for m in ms if m > 16384]


def run(presets, ms, dtypes, sparsities, rounds=3, search_min_m=1, seed=0, log=print, progress=None,
        rows: list | None = None, checkpoint=None):
    """Appends to `rows` as it goes (pass a list to keep what was measured if interrupted);
    calls checkpoint(rows) after each M of each preset."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = [] if rows is None else rows
    total, done, t0 = len(presets) * 4 * len(dtypes) * len(ms), 0, time.time()
    for p in presets:
        shapes = linear_shapes(p)
        prepared = {(layer, dt): prepare_layer(n, k, dt, sparsities, gen)
                    for layer, (n, k) in shapes.items() for dt in dtypes}
        algs: dict = {}  # cuSPARSELt's pick at the largest searched M, reused above 16384
        for m in _m_order(ms):
            for (layer, dt), prep in prepared.items():
                n, k = shapes[layer]
                reuse = {sp: algs.get((layer, dt, sp)) for sp in sparsities} if m > 16384 else None
                rr = min(rounds, 2) if m >= 16384 else rounds
                new = bench_config(p, layer, n, k, m, dt, prep, rr, gen, search_min_m, log, reuse)
                rows += new
                if m <= 16384:  # M runs 16384 first: keep the pick of the largest searched M
                    for r in new:
                        if r.part == "gemm" and r.variant != "dense":
                            algs.setdefault((layer, dt, r.variant), r.alg_id)
                torch.cuda.empty_cache()
                done += 1
                if progress:
                    progress(done, total, f"{p} {layer} M={m} {dt} ({time.time() - t0:.0f}s)")
            if checkpoint:
                checkpoint(rows)
        del prepared
        torch.cuda.empty_cache()
    return rows
