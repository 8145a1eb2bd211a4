"""Fused dequantization + bias: out[m, n] = acc[m, n] * s_tok[m] * s_ch[n] + bias[n], in float32.

acc is the GEMM's output (int32, float32 or bf16), read through its strides, so a column-major
result ([N, M] storage, as cuSPARSELt writes without transpose_result) needs no copy. Only the
first `n` columns and `m` rows are read: the GEMM may have computed padded rows or columns.
Offsets are int64 (M * N passes 2**31 at M=65536, N=37888).
"""

from __future__ import annotations

import torch

from . import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["dequant", "DequantError"]


class DequantError(ValueError):
    pass


if triton is not None:
    @triton.jit
    def _dequant_kernel(acc_ptr, st_ptr, sc_ptr, b_ptr, out_ptr, M, N,
                        stride_am, stride_an, stride_om,
                        HAS_SC: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        pm = pid // tiles_n
        pn = pid - pm * tiles_n
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        mask = mm[:, None] & mn[None, :]
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        a = tl.load(acc_ptr + rm64[:, None] * stride_am + rn64[None, :] * stride_an, mask=mask, other=0)
        y = a.to(tl.float32) * tl.load(st_ptr + rm, mask=mm, other=0.0)[:, None]
        if HAS_SC:
            y = y * tl.load(sc_ptr + rn, mask=mn, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def dequant(acc: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor | None, bias: torch.Tensor | None,
            out_dtype: torch.dtype, m: int | None = None, n: int | None = None,
            out: torch.Tensor | None = None, impl: str = "triton") -> torch.Tensor:
    """acc [>=m, >=n] -> out [m, n] in out_dtype (acc may be any strided 2-D view)."""
    if acc.dim() != 2:
        raise DequantError(f"expected a 2-D accumulator, got {tuple(acc.shape)}")
    m = acc.shape[0] if m is None else m
    n = acc.shape[1] if n is None else n
    if impl == "torch":
        return reference.dequant_ref(acc[:m, :n], s_tok[:m], s_ch, bias, out_dtype)
    if impl != "triton":
        raise DequantError(f"unknown impl {impl!r}: choose triton or torch")
    if triton is None:
        raise DequantError("the Triton dequant kernel needs triton (use impl='torch' for the reference)")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    # decode-sized M: short, wide tiles; prefill: square-ish tiles of 16 KB of output
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 256 if m <= 32 else 128
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _dequant_kernel[grid](acc, s_tok, s_ch if s_ch is not None else s_tok, bias if bias is not None else s_tok,
                          out, m, n, acc.stride(0), acc.stride(1), out.stride(0),
                          HAS_SC=s_ch is not None, HAS_BIAS=bias is not None,
                          BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
