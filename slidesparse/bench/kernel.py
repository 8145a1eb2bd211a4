"""Kernel benchmark: dense vs SlideSparse, per preset shape, M and dtype, through the runtime's own
linear (bench/harness.py), so that what is benchmarked is what serves.

Parts, each timed as CUDA-graph replays of back-to-back calls (launch gaps and host work out, for
dense and sparse alike), every variant of one (shape, M, dtype) in the same process, interleaved
over rounds, the median kept:

    gemm          the GEMM alone on ready codes (dense: with the scales in its epilogue; SlideSparse:
                  cuSPARSELt on the lifted codes, bf16 out, no scales)
    quant         per-token quantization (+ lift for SlideSparse), the Triton kernel
    dequant       SlideSparse's Triton dequant pass (the dense GEMMs need none)
    linear        the whole layer, eager (vLLM --enforce-eager)
    traced        the whole layer as vLLM runs it by default: compiled by Inductor between an RMSNorm
                  producer and a residual-add consumer (fusions included), dense and sparse alike
    traced_in_op  (--forms in_op) a SlideSparse layer whose plan also has dense buckets: its
                  cuSPARSELt buckets dequantize inside the op
    traced_cutlass  (--forms in_op, where the library is built) the same layer on SlideSparse's
                  CUTLASS kernel (scales and bias in its epilogue), default configuration per M

Baselines: variant "dense" is what users run, vLLM's CUTLASS scaled_mm (kernels/dense.py) when
vLLM is importable; its `impl` column names the kernel. torch._scaled_mm (FP8) and the Triton INT8
GEMM stay as extra columns ("dense:torch_scaled_mm", "dense:triton_int8"). Without vLLM, "dense"
is the stand-in of kernels/dense.py and the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.quant import DTYPES
from .harness import DENSE_EVERYWHERE, graph_time_ms, prepare, random_weight, traced_forward
from .shapes import linear_shapes

SPARSITIES = ("2_4", "2_6", "2_8", "2_10", "2_inf")
DEFAULT_MS = (16, 64, 256, 1024, 4096, 16384, 65536)
FORMS = ("eager", "traced", "in_op")


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


def prepare_layer(n, k, dtype, sparsities, ms, gen, forms, search_min_m, log):
    """Everything of one (shape, dtype) that does not depend on M, made once: the dense weight and
    its layers, and per sparsity the cuSPARSELt algorithm searched at each M and the runtime layers
    with a plan holding one bucket per measured M."""
    from ..core.tuning import MAX_M
    from ..kernels import cusparselt as cl
    from ..kernels.quant_slide import quant_slide
    dense_w = random_weight(n, k, "2_inf", dtype, gen)   # unpruned: 2_inf slides without pruning
    out = {"dense": {"w": dense_w, "layers": {}}, "sparse": {}}
    be, layer = prepare(dense_w, DENSE_EVERYWHERE)
    out["dense"]["layers"]["eager"] = (be, layer)
    if "traced" in forms:
        out["dense"]["layers"]["traced"] = traced_forward(be, layer)
    acc_dt = cl.acc_dtype_for(DTYPES[dtype])
    for sp in sparsities:
        w = random_weight(n, k, sp, dtype, gen)
        wc = cl.compress(w.slid)
        algs = {}
        for m in ms:
            algs[m] = 0
            if m >= search_min_m:
                xq, _ = quant_slide(torch.randn(m, k, device="cuda", generator=gen).bfloat16(), w.pattern, dtype,
                                    k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
                try:
                    algs[m] = cl.search_alg(wc, xq, acc_dt)
                except RuntimeError as e:  # keep the default; say so in the log
                    log(f"  search failed for N={n} K={k} {sp} M={m}: {str(e).splitlines()[0]}")
        plan = [(m, "sparse", algs[m]) for m in sorted(ms)]
        layers = {}
        be, layer = prepare(w, plan)
        layers["eager"] = (be, layer)
        if "traced" in forms:
            layers["traced"] = traced_forward(be, layer)
        if "in_op" in forms:
            layers["traced_in_op"] = traced_forward(*prepare(w, plan + [(MAX_M, "dense", 0)]))
            from ..kernels import cutlass_sparse as cs
            if cs.available() and n % cs.N_ALIGN == 0:
                cut = [(m, "cutlass", 0, cs.default_config(DTYPES[dtype], m)) for m in sorted(ms)]
                layers["traced_cutlass"] = traced_forward(*prepare(w, cut))
        out["sparse"][sp] = {"w": w, "wc": wc, "algs": algs, "layers": layers}
    return out


def bench_config(preset, layer_name, n, k, m, dtype, prep, rounds, gen, log):
    from ..kernels import cusparselt as cl
    from ..kernels.dense import dense_kernel, dense_scaled_mm
    from ..kernels.dequant import dequant
    from ..kernels.quant_slide import quant_only, quant_slide

    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    residual = torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)
    variants: dict[tuple[str, str], tuple] = {}
    dw = prep["dense"]
    dlayer = dw["layers"]["eager"][1]
    wq, ws = dlayer.ss_w_dense, dlayer.ss_w_scale
    qd, sd = quant_only(x, dtype)
    kernel = dense_kernel(dtype)
    variants[("dense", "gemm")] = (lambda: dense_scaled_mm(qd, wq, sd, ws, None, torch.bfloat16, kernel), kernel)
    extras = ("torch_scaled_mm",) if dtype == "fp8_e4m3" else ("triton_int8",)
    for ex in extras:
        if ex != kernel:
            variants[(f"dense:{ex}", "gemm")] = (lambda ex=ex: dense_scaled_mm(qd, wq, sd, ws, None, torch.bfloat16, ex),
                                                 ex)
    variants[("dense", "quant")] = (lambda: quant_only(x, dtype), "triton")
    be, lay = dw["layers"]["eager"]
    variants[("dense", "linear")] = (lambda: be.apply(lay, x, None), f"quant+{kernel}")
    if "traced" in dw["layers"]:
        f = dw["layers"]["traced"]
        variants[("dense", "traced")] = (lambda: f(x, residual), f"inductor(rmsnorm+quant)+{kernel}+add")

    meta = {}
    acc_dt = cl.acc_dtype_for(DTYPES[dtype])
    for sp, d in prep["sparse"].items():
        pat, wc, alg = d["w"].pattern, d["wc"], d["algs"][m]
        sc = d["w"].scale.contiguous()
        meta[sp] = (pat.lifted_k(k), alg)
        xq, st = quant_slide(x, pat, dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
        acc = cl.sparse_mm(wc, xq, acc_dt, alg_id=alg, n=cl.padded_n(n))
        variants[(sp, "gemm")] = ((lambda wc=wc, xq=xq, alg=alg: cl.sparse_mm(wc, xq, acc_dt, alg_id=alg,
                                                                                n=cl.padded_n(n))), "cusparselt")
        variants[(sp, "quant")] = ((lambda pat=pat: quant_slide(x, pat, dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)),
                                   "triton")
        variants[(sp, "dequant")] = ((lambda acc=acc, st=st, sc=sc: dequant(acc, st, sc, None, torch.bfloat16, m=m, n=n)),
                                     "triton")
        be_s, lay_s = d["layers"]["eager"]
        variants[(sp, "linear")] = ((lambda be_s=be_s, lay_s=lay_s: be_s.apply(lay_s, x, None)),
                                    "quant_slide+cusparselt+dequant")
        if "traced" in d["layers"]:
            variants[(sp, "traced")] = ((lambda f=d["layers"]["traced"]: f(x, residual)),
                                        "inductor(rmsnorm+quant)+lift_codes+cusparselt+inductor(dequant+add)")
        if "traced_in_op" in d["layers"]:
            variants[(sp, "traced_in_op")] = ((lambda f=d["layers"]["traced_in_op"]: f(x, residual)),
                                              "inductor(rmsnorm+quant)+lift_codes+cusparselt+dequant+add")
        if "traced_cutlass" in d["layers"]:
            variants[(sp, "traced_cutlass")] = ((lambda f=d["layers"]["traced_cutlass"]: f(x, residual)),
                                                "inductor(rmsnorm+quant)+lift_codes+slidesparse_cutlass(epilogue)+add")

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
                log(f"  {preset} {layer_name} M={m} {dtype} {key}: {str(e).splitlines()[0][:160]}")
    rows = []
    for (variant, part), ts in times.items():
        if not ts:
            continue
        kl, alg = meta.get(variant, (k, 0))
        rows.append(Row(preset, layer_name, n, k, m, dtype, variant, part, sorted(ts)[len(ts) // 2],
                        variants[(variant, part)][1], kl, alg))
    return rows


def _m_order(ms):
    """The headline M (16384) first, the most expensive (> 16384) last: an interrupted run keeps
    what matters most."""
    ms = sorted(ms)
    head = [m for m in ms if m == 16384]
    return head + [m for m in reversed(ms) if m < 16384] + [m for m in ms if m > 16384]


def run(presets, ms, dtypes, sparsities, rounds=3, search_min_m=1, seed=0, log=print, progress=None,
        rows: list | None = None, checkpoint=None, forms=("eager", "traced")):
    """Appends to `rows` as it goes (pass a list to keep what was measured if interrupted);
    calls checkpoint(rows) after each M of each preset."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = [] if rows is None else rows
    total, done, t0 = len(presets) * 4 * len(dtypes) * len(ms), 0, time.time()
    for p in presets:
        shapes = linear_shapes(p)
        prepared = {}
        for layer, (n, k) in shapes.items():
            for dt in dtypes:
                prepared[(layer, dt)] = prepare_layer(n, k, dt, sparsities, ms, gen, forms, search_min_m, log)
                if progress:
                    progress(done, total, f"{p} {layer} {dt}: prepared ({time.time() - t0:.0f}s)")
        for m in _m_order(ms):
            for (layer, dt), prep in prepared.items():
                n, k = shapes[layer]
                rr = min(rounds, 2) if m >= 16384 else rounds
                rows += bench_config(p, layer, n, k, m, dt, prep, rr, gen, log)
                done += 1
                if progress:
                    progress(done, total, f"{p} {layer} M={m} {dt} ({time.time() - t0:.0f}s)")
            if checkpoint:
                checkpoint(rows)
        del prepared
        torch.cuda.empty_cache()
    return rows
