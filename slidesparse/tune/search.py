"""Per-shape, per-M-bucket algorithm search for the cusparselt backend.

For each distinct (N, K) of a checkpoint's converted layers and each M bucket, on random data of
the layer's pattern and dtype (the GEMM's speed does not depend on the values): cuSPARSELt's own
search picks the algorithm id, then the whole sparse linear (quant+slide, GEMM, dequant) is timed
against the whole dense linear of the dtype, interleaved; a bucket where dense wins is marked
"dense" (the runtime then keeps the unslid weight for it; docs/performance.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..format import SUFFIX_SHAPE, TUNING_FILE, SlideSparseConfig, empty_tuning
from ..quant import DTYPES

M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)


class TuneError(ValueError):
    pass


# vLLM fuses these checkpoint projections into one linear layer (its packed_modules_mapping for
# Llama, Qwen2 and BitNet): the runtime sees, and looks up, the fused N
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
ROW_PARALLEL = ("o_proj", "down_proj")


def runtime_shapes(projections: dict[str, tuple[int, int]], model_config: dict, tp: int = 1) -> list[tuple[int, int]]:
    """The (N, K) each vLLM linear layer has on one of `tp` ranks, from the checkpoint's
    per-projection (N, K): q/k/v and gate/up fused along N, column-parallel N split (KV heads
    replicated when fewer than ranks, as vLLM does), row-parallel (o, down) K split."""
    heads = int(model_config.get("num_attention_heads", 1))
    head_dim = int(model_config.get("head_dim") or int(model_config.get("hidden_size", heads)) // heads)
    fused: dict[tuple[str, str], list[int]] = {}
    for module, (n, k) in projections.items():
        parent, _, proj = module.rpartition(".")
        if proj in ROW_PARALLEL:
            if k % tp:
                raise TuneError(f"{module}: K={k} does not split over {tp} ranks")
            n_local, k_local = n, k // tp
        elif proj in ("k_proj", "v_proj") and n // head_dim < tp:
            n_local, k_local = head_dim, k                  # replicated KV head
        else:
            if n % tp:
                raise TuneError(f"{module}: N={n} does not split over {tp} ranks")
            n_local, k_local = n // tp, k
        key = (parent, FUSED.get(proj, proj))
        acc = fused.setdefault(key, [0, k_local])
        if acc[1] != k_local:
            raise TuneError(f"{parent}: fused projections disagree on K ({acc[1]} vs {k_local})")
        acc[0] += n_local
    return sorted({(n, k) for n, k in fused.values()})


def checkpoint_shapes(ckpt: Path, tp: int = 1) -> tuple[SlideSparseConfig, list[tuple[int, int]]]:
    """(config, sorted distinct (N, K) of the layers vLLM builds on one of `tp` ranks)."""
    from ..convert.errors import ConvertError
    from ..convert.load import checkpoint_kind
    from ..convert.reader import Checkpoint

    try:
        c = Checkpoint(ckpt)  # validates config.json and every safetensors header
        kind, cfg = checkpoint_kind(c)
    except ConvertError as e:
        raise TuneError(str(e)) from None
    if kind != "slidesparse":
        raise TuneError(f"{ckpt} is a dense {kind} checkpoint: nothing to tune")
    suffix = "." + SUFFIX_SHAPE
    projections = {name[:-len(suffix)]: tuple(int(v) for v in c.get(name).tolist())
                   for name in c.tensors if name.endswith(suffix)}
    if not projections:
        raise TuneError(f"{ckpt}: no converted layers ({SUFFIX_SHAPE} tensors) found")
    return cfg, runtime_shapes(projections, c.config, tp)


def tune_shape(n: int, k: int, cfg: SlideSparseConfig, buckets=M_BUCKETS, rounds: int = 3) -> list[dict]:
    from ..bench.kernel import graph_time_ms, pruned_slid_weight
    from ..kernels import cusparselt as cl
    from ..kernels.dequant import dequant
    from ..kernels.quant_slide import quant_only, quant_slide
    from ..pattern import unslide

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
        entries.append({"n": n, "k_lifted": pat.lifted_k(k), "dtype": wdt, "m_max": m, "backend": best,
                        "alg_id": alg, "split_k": 1, "split_k_buffers": None,
                        "us": round(1000 * min(t_s, t_d), 2), "us_sparse": round(1000 * t_s, 2),
                        "us_dense": round(1000 * t_d, 2)})
    return entries


def tune_checkpoint(ckpt: Path, buckets=M_BUCKETS, progress=None, tp: int = 1) -> Path:
    cfg, shapes = checkpoint_shapes(ckpt, tp)
    if not torch.cuda.is_available():
        raise TuneError("tuning needs the CUDA GPU the checkpoint will run on")
    table = empty_tuning(torch.cuda.get_device_name())
    table["tensor_parallel_size"] = tp
    table["library"] = f"cuSPARSELt {torch.backends.cusparselt.version()} (torch {torch.__version__})"
    for i, (n, k) in enumerate(shapes):
        table["entries"] += tune_shape(n, k, cfg, buckets)
        if progress:
            progress(i + 1, len(shapes), f"N={n} K={k}")
    out = ckpt / TUNING_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, out)
    return out
