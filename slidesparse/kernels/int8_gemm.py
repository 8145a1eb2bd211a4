"""Dense INT8 GEMM baseline in Triton, with the per-token x per-channel dequant and bias fused.

    out[m, n] = (sum_k a[m, k] * w[n, k]) * s_tok[m] * s_ch[n] + bias[n]     (int32 accumulate)

torch._int_mm is weak on the H100 and leaves the dequant to a second pass, so the INT8 baseline
is the faster of this kernel and torch._int_mm + our dequant kernel, measured in the same run.
The autotune table is small on purpose (a few Hopper-friendly tiles), keyed on (M bucket, N, K).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["int8_linear"]


def _configs():
    cfgs = []
    for bm, bn, bk, st, wp in [(128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
                               (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (16, 128, 256, 3, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_stages=st, num_warps=wp))
    return cfgs


if triton is not None:
    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _int8_mm_kernel(a_ptr, w_ptr, st_ptr, sc_ptr, b_ptr, out_ptr, M, N, K, M_BUCKET,
                        stride_am, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering keeps a band of W tiles in L2 while M tiles sweep it
        width = GROUP_M * grid_n
        group = pid // width
        first_m = group * GROUP_M
        gm = min(grid_m - first_m, GROUP_M)
        pm = first_m + (pid % width) % gm
        pn = (pid % width) // gm
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & km[None, :], other=0)
            w = tl.load(w_ptrs, mask=km[:, None] & (rn[None, :] < N), other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        mm = rm < M
        mn = rn < N
        y = acc.to(tl.float32) * tl.load(st_ptr + rm, mask=mm, other=0.0)[:, None]
        y = y * tl.load(sc_ptr + rn, mask=mn, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def _bucket(m: int) -> int:
    return 1 << max(4, (m - 1).bit_length())


def int8_linear(a: torch.Tensor, w: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, m: int | None = None) -> torch.Tensor:
    """a [>=m, K] int8, w [N, K] int8 -> [m, N] in out_dtype."""
    if triton is None:
        raise RuntimeError("the Triton INT8 GEMM needs triton")
    m = a.shape[0] if m is None else m
    n, k = w.shape
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_mm_kernel[grid](a, w, s_tok, s_ch, bias if bias is not None else s_ch, out, m, n, k, _bucket(m),
                          a.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None)
    return out
