"""The SlideSparse linear on the GPU: pure functions of their arguments, and the custom ops vLLM's
graphs call (torch.library: opaque to torch.compile, with fake implementations, safe under
CUDA-graph capture: no host sync, allocations only from torch's caching allocator).

A layer's GEMM choice is its bucket plan, a flat int list of (m_max, kind, alg_id, split_k)
quadruples in ascending m_max: a call with M rows runs the first bucket with m_max >= M (the last
one also covers larger M); an empty plan runs the sparse GEMM with algorithm 0 everywhere.
kind SPARSE is the lifted 2:4 GEMM on cuSPARSELt (alg_id, split_k), CUTLASS the lifted 2:4 GEMM on
SlideSparse's CUTLASS kernel (kernels/cutlass_sparse.py; alg_id indexes the layer's `cutlass_configs`,
a ';'-joined list of configuration names) with the scales and the bias in its epilogue, DENSE the
dense GEMM of the dtype with the scales in its epilogue (kernels/dense.py) on the unslid weight.

    slidesparse::sparse_linear(x, ...)            eager: one op for the whole layer
    slidesparse::sparse_mm(codes, ...)            traced, every bucket sparse: lift + GEMM -> unscaled
                                                  accumulator; the caller's dequant, written in torch
                                                  ops, is fused by Inductor into the consumer
    slidesparse::sparse_linear_codes(codes, ...)  traced, some bucket dense or CUTLASS: codes and token
                                                  scales in, the finished output out (dense and CUTLASS
                                                  buckets apply the scales in their epilogues; a
                                                  cuSPARSELt bucket dequantizes in a pass of its own)
    slidesparse::sparse_mm_lifted(x', ...)        traced, lifted pattern, every bucket cuSPARSELt: x' as its
                                                  producer wrote it (kernels/fused_lift.py), no lift pass
    slidesparse::sparse_linear_lifted(x', ...)    the same with CUTLASS buckets: the finished output

In the traced forms the caller quantizes x in torch ops in x's shape (core.quant.quantize_rows),
which Inductor fuses into the op that produced x, as it does for vLLM's own per-token quantization;
with the lift fusion opted in (runtime/lift_fusion.py), a lifted layer with no dense bucket instead
takes x' from slidesparse::quant_lift, which the pass replaces by the producer's kernel.
"""

from __future__ import annotations

import torch

from ..core.pattern import Pattern, parse_pattern
from .library import op

SPARSE, DENSE, CUTLASS = 0, 1, 2
KINDS = {"sparse": SPARSE, "dense": DENSE, "cutlass": CUTLASS}

__all__ = ["SPARSE", "DENSE", "CUTLASS", "KINDS", "choose", "plan_kinds", "linear_eager", "mm_lifted",
           "cutlass_lifted", "linear_from_codes", "mm_from_lifted", "linear_from_lifted", "acc_dtype"]


def choose(plan: list[int], m: int) -> tuple[int, int, int]:
    """(kind, alg_id, split_k) of the bucket that serves M rows."""
    if not plan:
        return SPARSE, 0, 1
    last = len(plan) - 4
    for i in range(0, last, 4):
        if m <= plan[i]:
            return plan[i + 1], plan[i + 2], plan[i + 3]
    return plan[last + 1], plan[last + 2], plan[last + 3]


def plan_kinds(plan: list[int]) -> set[int]:
    return {SPARSE} if not plan else set(plan[1::4])


def acc_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    from . import cusparselt as cl
    return cl.acc_dtype_for(weight_dtype)


_PATTERNS: dict[str, Pattern] = {}


def _pattern(sparsity: str) -> Pattern:
    # parsed once per spelling: every layer call names its pattern as a string (the op's schema)
    pat = _PATTERNS.get(sparsity)
    if pat is None:
        pat = _PATTERNS[sparsity] = parse_pattern(sparsity)
    return pat


def _cutlass_weight(values, meta, n: int, k: int):
    from .cutlass_sparse import CompressedWeight
    return CompressedWeight(values=values, meta=meta, n=n, k=k)


def cutlass_lifted(codes: torch.Tensor, s_tok: torch.Tensor, cw_values: torch.Tensor, cw_meta: torch.Tensor,
                   cw_k: int, w_scale: torch.Tensor, bias: torch.Tensor | None, n: int, sparsity: str, config: str,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """codes [M, K] (1-byte, in x's shape) -> the finished output [M, N]: lift the codes (no row
    padding: the kernel takes any M), then the CUTLASS kernel with scales and bias in its epilogue."""
    from . import cutlass_sparse as cs
    from .quant_slide import lift_codes
    x_lifted = lift_codes(codes, _pattern(sparsity), cs.K_ALIGN, 1, impl="gpu" if codes.is_cuda else "torch")
    return _cutlass_mm(x_lifted, s_tok, cw_values, cw_meta, cw_k, w_scale, bias, n, config, out_dtype)


def _cutlass_mm(x_lifted, s_tok, cw_values, cw_meta, cw_k: int, w_scale, bias, n: int, config: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    """SlideSparse's CUTLASS kernel on lifted codes [M, K'] (no row padding): the finished output."""
    from . import cutlass_sparse as cs
    return cs.scaled_sparse_mm(x_lifted, _cutlass_weight(cw_values, cw_meta, n, cw_k), s_tok.contiguous(), w_scale,
                               None if bias is None else bias.to(out_dtype).contiguous(), out_dtype, config)


def linear_eager(x: torch.Tensor, w_compressed: torch.Tensor | None, w_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, w_dense: torch.Tensor | None, n: int, sparsity: str,
                 act_dtype: str, plan: list[int], cw_values: torch.Tensor | None = None,
                 cw_meta: torch.Tensor | None = None, cw_k: int = 0, cutlass_configs: str = "") -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: the Triton quant+slide, the cuSPARSELt GEMM and the Triton
    dequant+bias for a sparse bucket; quantization and the dense GEMM for a dense one."""
    from . import cusparselt as cl
    from .dense import dense_scaled_mm
    from .dequant import dequant
    from .quant_slide import quant_only, quant_slide

    pat = _pattern(sparsity)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    kind, alg, split_k = choose(plan, m)
    if kind == CUTLASS:
        from . import cutlass_sparse as cs
        xq, s_tok = quant_slide(x2, pat, act_dtype, k_align=cs.K_ALIGN)  # quantized and lifted in one pass
        out = _cutlass_mm(xq, s_tok, cw_values, cw_meta, cw_k, w_scale, bias, n, cutlass_configs.split(";")[alg],
                          x.dtype)
    elif kind == DENSE:
        if not act_dtype:
            out = torch.nn.functional.linear(x2.to(w_dense.dtype), w_dense,
                                             None if bias is None else bias.to(w_dense.dtype))
        else:
            q, s = quant_only(x2, act_dtype)
            out = dense_scaled_mm(q, w_dense, s, w_scale, bias, x.dtype)
    elif not act_dtype:
        wdt = w_compressed.dtype if w_compressed.dtype in (torch.bfloat16, torch.float16) else x.dtype
        xq, _ = quant_slide(x2, pat, None, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN, out_dtype=wdt)
        acc = cl.sparse_mm(w_compressed, xq, None, alg_id=alg, split_k=split_k, n=cl.padded_n(n))
        out = acc[:m, :n]
        out = out + bias.to(out.dtype) if bias is not None else out.contiguous()
    else:
        xq, s_tok = quant_slide(x2, pat, act_dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
        out = dequant(mm_from_lifted(xq, w_compressed, n, alg, split_k), s_tok, w_scale, bias, x.dtype, m=m, n=n)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def mm_lifted(codes: torch.Tensor, w_compressed: torch.Tensor, n: int, sparsity: str, alg: int,
              split_k: int) -> torch.Tensor:
    """codes [M, K] (1-byte, in x's shape) -> unscaled accumulator [M, N_pad] (bf16): lift the codes
    and pad M to the GEMM's alignment (lift_codes; 2_4 only pads, and only an unaligned M), then
    the cuSPARSELt GEMM."""
    from . import cusparselt as cl
    from .quant_slide import lift_codes
    m = codes.shape[0]
    x_lifted = lift_codes(codes, _pattern(sparsity), cl.K_ALIGN, cl.M_ALIGN,
                          impl="gpu" if codes.is_cuda else "torch")
    return mm_from_lifted(x_lifted, w_compressed, n, alg, split_k)[:m]


def linear_from_codes(codes: torch.Tensor, s_tok: torch.Tensor, w_compressed: torch.Tensor | None,
                      w_scale: torch.Tensor, bias: torch.Tensor | None, w_dense: torch.Tensor | None, n: int,
                      sparsity: str, plan: list[int], out_dtype: torch.dtype, cw_values: torch.Tensor | None = None,
                      cw_meta: torch.Tensor | None = None, cw_k: int = 0, cutlass_configs: str = "") -> torch.Tensor:
    """codes [M, K], s_tok [M] -> the finished output [M, N] in out_dtype."""
    from .dense import dense_scaled_mm
    from .dequant import dequant
    m = codes.shape[0]
    kind, alg, split_k = choose(plan, m)
    if kind == DENSE:
        return dense_scaled_mm(codes, w_dense, s_tok, w_scale, bias, out_dtype)
    if kind == CUTLASS:
        return cutlass_lifted(codes, s_tok, cw_values, cw_meta, cw_k, w_scale, bias, n, sparsity,
                              cutlass_configs.split(";")[alg], out_dtype)
    acc = mm_lifted(codes, w_compressed, n, sparsity, alg, split_k)
    return dequant(acc, s_tok, w_scale, bias, out_dtype, m=m, n=n, impl="triton" if codes.is_cuda else "torch")


def mm_from_lifted(lifted: torch.Tensor, w_compressed: torch.Tensor, n: int, alg: int, split_k: int) -> torch.Tensor:
    """x' [M_pad, K'_pad] (rows padded to cuSPARSELt's M_ALIGN) -> unscaled accumulator [M_pad, N_pad]."""
    from . import cusparselt as cl
    return cl.sparse_mm(w_compressed, lifted, cl.acc_dtype_for(lifted.dtype), alg_id=alg, split_k=split_k,
                        n=cl.padded_n(n))


def linear_from_lifted(lifted: torch.Tensor, s_tok: torch.Tensor, w_compressed: torch.Tensor | None,
                       w_scale: torch.Tensor, bias: torch.Tensor | None, n: int, plan: list[int],
                       out_dtype: torch.dtype, cw_values: torch.Tensor | None = None,
                       cw_meta: torch.Tensor | None = None, cw_k: int = 0, cutlass_configs: str = "") -> torch.Tensor:
    """x' [M_pad, K'_pad] as a producer wrote it (kernels/fused_lift.py), s_tok [M] -> the finished
    output [M, N]. Plans without a dense bucket only: a dense GEMM needs the unlifted codes."""
    from .dequant import dequant
    m = s_tok.shape[0]
    kind, alg, split_k = choose(plan, m)
    if kind == DENSE:
        raise RuntimeError("slidesparse: a dense bucket cannot take lifted activations")
    if kind == CUTLASS:
        return _cutlass_mm(lifted[:m], s_tok, cw_values, cw_meta, cw_k, w_scale, bias, n,
                           cutlass_configs.split(";")[alg], out_dtype)
    acc = mm_from_lifted(lifted, w_compressed, n, alg, split_k)
    return dequant(acc, s_tok, w_scale, bias, out_dtype, m=m, n=n, impl="triton" if lifted.is_cuda else "torch")


# ----------------------------------------------------------------------------- the custom ops

@op("slidesparse::sparse_linear")
def sparse_linear(x: torch.Tensor, w_compressed: torch.Tensor | None, w_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, w_dense: torch.Tensor | None, n: int, sparsity: str,
                  act_dtype: str, plan: list[int], cw_values: torch.Tensor | None, cw_meta: torch.Tensor | None,
                  cw_k: int, cutlass_configs: str) -> torch.Tensor:
    return linear_eager(x, w_compressed, w_scale, bias, w_dense, n, sparsity, act_dtype, plan, cw_values, cw_meta,
                        cw_k, cutlass_configs)


@sparse_linear.register_fake
def _(x, w_compressed, w_scale, bias, w_dense, n, sparsity, act_dtype, plan, cw_values, cw_meta, cw_k,
      cutlass_configs):
    return x.new_empty(*x.shape[:-1], n)


@op("slidesparse::sparse_mm")
def sparse_mm(codes: torch.Tensor, w_compressed: torch.Tensor, n: int, sparsity: str,
              plan: list[int]) -> torch.Tensor:
    kind, alg, split_k = choose(plan, codes.shape[0])
    if kind != SPARSE:
        raise RuntimeError("slidesparse::sparse_mm serves layers whose every bucket is sparse")
    return mm_lifted(codes, w_compressed, n, sparsity, alg, split_k)


@sparse_mm.register_fake
def _(codes, w_compressed, n, sparsity, plan):
    from . import cusparselt as cl
    return codes.new_empty(codes.shape[0], cl.padded_n(n), dtype=cl.acc_dtype_for(codes.dtype))


@op("slidesparse::sparse_linear_codes")
def sparse_linear_codes(codes: torch.Tensor, s_tok: torch.Tensor, w_compressed: torch.Tensor | None,
                        w_scale: torch.Tensor, bias: torch.Tensor | None, w_dense: torch.Tensor | None, n: int,
                        sparsity: str, plan: list[int], out_dtype: torch.dtype, cw_values: torch.Tensor | None,
                        cw_meta: torch.Tensor | None, cw_k: int, cutlass_configs: str) -> torch.Tensor:
    return linear_from_codes(codes, s_tok, w_compressed, w_scale, bias, w_dense, n, sparsity, plan, out_dtype,
                             cw_values, cw_meta, cw_k, cutlass_configs)


@sparse_linear_codes.register_fake
def _(codes, s_tok, w_compressed, w_scale, bias, w_dense, n, sparsity, plan, out_dtype, cw_values, cw_meta, cw_k,
      cutlass_configs):
    return codes.new_empty(codes.shape[0], n, dtype=out_dtype)


@op("slidesparse::sparse_mm_lifted")
def sparse_mm_lifted(lifted: torch.Tensor, w_compressed: torch.Tensor, n: int, plan: list[int]) -> torch.Tensor:
    # the bucket of the padded row count: bucket bounds are multiples of cuSPARSELt's M_ALIGN
    kind, alg, split_k = choose(plan, lifted.shape[0])
    if kind != SPARSE:
        raise RuntimeError("slidesparse::sparse_mm_lifted serves layers whose every bucket is sparse")
    return mm_from_lifted(lifted, w_compressed, n, alg, split_k)


@sparse_mm_lifted.register_fake
def _(lifted, w_compressed, n, plan):
    from . import cusparselt as cl
    return lifted.new_empty(lifted.shape[0], cl.padded_n(n), dtype=cl.acc_dtype_for(lifted.dtype))


@op("slidesparse::sparse_linear_lifted")
def sparse_linear_lifted(lifted: torch.Tensor, s_tok: torch.Tensor, w_compressed: torch.Tensor | None,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, n: int, plan: list[int],
                         out_dtype: torch.dtype, cw_values: torch.Tensor | None, cw_meta: torch.Tensor | None,
                         cw_k: int, cutlass_configs: str) -> torch.Tensor:
    return linear_from_lifted(lifted, s_tok, w_compressed, w_scale, bias, n, plan, out_dtype, cw_values, cw_meta,
                              cw_k, cutlass_configs)


@sparse_linear_lifted.register_fake
def _(lifted, s_tok, w_compressed, w_scale, bias, n, plan, out_dtype, cw_values, cw_meta, cw_k, cutlass_configs):
    return lifted.new_empty(s_tok.shape[0], n, dtype=out_dtype)


from . import fused_lift  # noqa: E402,F401  (the producer ops, slidesparse::*quant_lift)
