"""Per-shape, per-M-bucket algorithm search for the cusparselt backend.

For each distinct (N, K) of a checkpoint's converted layers and each M bucket, on random data of
the layer's pattern and dtype (the GEMM's speed does not depend on the values): cuSPARSELt's own
search picks the algorithm id, then the whole sparse linear (quant+slide, GEMM, dequant) is timed
against the whole dense linear of the dtype, interleaved; a bucket where dense wins is marked
"dense" (the runtime then keeps the unslid weight for it; docs/performance.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.checkpoint import Checkpoint, checkpoint_kind
from ..core.errors import SlideSparseError
from ..core.format import SUFFIX_SHAPE, TUNING_FILE, SlideSparseConfig
from ..core.layout import vllm_layer_shapes
from ..core.quant import DTYPES
from ..core.tuning import TuningEntry, TuningTable

M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)


class TuneError(SlideSparseError):
    pass


def checkpoint_shapes(ckpt: Path, tp: int = 1) -> tuple[SlideSparseConfig, list[tuple[int, int]]]:
    """(config, sorted distinct (N, K) of the layers vLLM builds on one of `tp` ranks)."""
    try:
        c = Checkpoint(ckpt)  # validates config.json and every safetensors header
        kind, cfg = checkpoint_kind(c)
        projections = {name[:-len("." + SUFFIX_SHAPE)]: tuple(int(v) for v in c.get(name).tolist())
                       for name in c.tensors if name.endswith("." + SUFFIX_SHAPE)}
        shapes = sorted(set(vllm_layer_shapes(projections, c.config, tp).values())) if projections else []
    except SlideSparseError as e:
        raise TuneError(str(e)) from None
    if kind != "slidesparse":
        raise TuneError(f"{ckpt} is a dense {kind} checkpoint: nothing to tune")
    if not projections:
        raise TuneError(f"{ckpt}: no converted layers ({SUFFIX_SHAPE} tensors) found")
    return cfg, shapes


def tune_shape(n: int, k: int, cfg: SlideSparseConfig, buckets=M_BUCKETS, rounds: int = 3) -> list[TuningEntry]:
    from ..bench.kernel import graph_time_ms, pruned_slid_weight
    from ..kernels import cusparselt as cl
    from ..kernels.dequant import dequant
    from ..kernels.quant_slide import quant_only, quant_slide
    from ..core.pattern import unslide

    pat, wdt = cfg.pattern, cfg.weight_dtype
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    ws, sc = pruned_slid_weight(n, k, pat.name, wdt, gen)
    wd = unslide(ws.float(), pat, k).to(ws.dtype)
    wc = cl.compress(ws)
    acc_dt = cl.acc_dtype_for(DTYPES[wdt]) if cfg.quantized else None
    act = cfg.activation_dtype
    entries = []
    for m in buckets:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        xq, _ = quant_slide(x, pat, act, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN,
                            out_dtype=None if act else DTYPES[wdt])
        alg = cl.search_alg(wc, xq, acc_dt)

        def sparse(alg=alg, x=x):
            q, s = quant_slide(x, pat, act, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN,
                               out_dtype=None if act else DTYPES[wdt])
            a = cl.sparse_mm(wc, q, acc_dt, alg_id=alg)
            return dequant(a, s, sc, None, torch.bfloat16, m=m, n=n) if act else a

        def dense(x=x):
            if act is None:
                return torch.nn.functional.linear(x.to(wd.dtype), wd)
            q, s = quant_only(x, act)
            if act == "int8":
                from ..kernels.int8_gemm import int8_linear
                return int8_linear(q, wd, s, sc, None, torch.bfloat16)
            return torch._scaled_mm(q, wd.t(), scale_a=s.view(-1, 1), scale_b=sc.view(1, -1), out_dtype=torch.bfloat16)

        ts, td = [], []
        for _ in range(rounds):
            ts.append(graph_time_ms(sparse))
            td.append(graph_time_ms(dense))
        t_s, t_d = sorted(ts)[len(ts) // 2], sorted(td)[len(td) // 2]
        best = "sparse" if t_s <= t_d else "dense"
        entries.append(TuningEntry(n=n, k_lifted=pat.lifted_k(k), dtype=wdt, m_max=m, backend=best, alg_id=alg,
                                   us=round(1000 * min(t_s, t_d), 2), us_sparse=round(1000 * t_s, 2),
                                   us_dense=round(1000 * t_d, 2)))
    return entries


def tune_checkpoint(ckpt: Path, buckets=M_BUCKETS, progress=None, tp: int = 1) -> Path:
    cfg, shapes = checkpoint_shapes(ckpt, tp)
    if not torch.cuda.is_available():
        raise TuneError("tuning needs the CUDA GPU the checkpoint will run on")
    entries = []
    for i, (n, k) in enumerate(shapes):
        entries += tune_shape(n, k, cfg, buckets)
        if progress:
            progress(i + 1, len(shapes), f"N={n} K={k}")
    table = TuningTable(device=torch.cuda.get_device_name(), tensor_parallel_size=tp, entries=tuple(entries),
                        library=f"cuSPARSELt {torch.backends.cusparselt.version()} (torch {torch.__version__})")
    out = ckpt / TUNING_FILE
    table.save(out)
    return out
