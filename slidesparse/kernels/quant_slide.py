"""Fused per-token quantization + activation lifting ("quant+slide"), and the quant-only variant.

    quant_slide(x [M, K], pattern, act_dtype) -> (x' [M_pad, K'_pad] int8 | fp8_e4m3, s_tok [M] fp32)

One program per row: pass 1 reads the row for its amax, pass 2 gathers the lifted columns (the
row is then in L1/L2, so HBM sees x once) and writes x' quantized. The math is exactly
slidesparse.quant (amax floor; qmax / amax the way torch evaluates it, reciprocal(amax) * qmax;
int8 round-half-even clamped to +-127; fp8 clamp to +-448 then round-to-nearest-even), so the
codes match the torch reference (the scale may differ from torch's CUDA division by 1 ulp).

Two gathers for the lifted patterns: 16-bit inputs with even K gather 32-bit pairs (every window
starts at an even column), others one element per lane; 2_4 and quant-only read contiguously.
Measured on the H100 (docs/performance.md), the pair gather is the slower of the two (clearly at
K=3584, slightly at K=18944); the committed results use it, so it stays the default until a new
benchmark run confirms the switch.

Layout the GEMM needs: K' is zero-padded to `k_align` columns and M to `m_align` rows (cuSPARSELt
wants 8-bit dense operands in multiples of 16); padded rows are written as zeros, padded columns
too, so the buffer never holds garbage (an fp8 0x7f byte would be NaN).

Row offsets are formed in int64: M * K' passes 2**31 at M=65536, K'=32768.

With act_dtype=None the kernel only lifts (the BF16/FP16 sparse path), keeping x's values.
Quant-only (the dense path) is the identity lift: pattern 2_4 with no padding to a group.

`impl="torch"` runs the reference implementation instead; it is never chosen silently.
"""

from __future__ import annotations

import torch

from ..pattern import Pattern, parse_pattern
from ..quant import AMAX_FLOOR, DTYPES, dtype_name, qmax
from . import reference

__all__ = ["quant_slide", "quant_only", "lifted_src_index", "padded_lifted_k", "QuantSlideError"]


class QuantSlideError(ValueError):
    pass


def padded_lifted_k(k: int, pat: Pattern | str, k_align: int = 1) -> int:
    kp = parse_pattern(pat).lifted_k(k)
    return -(-kp // k_align) * k_align


def lifted_src_index(c: torch.Tensor, k: int, group: int, windows: int) -> torch.Tensor:
    """The kernel's index math in torch (for CPU tests): source column of lifted column c, or -1.

    Lifted column c lies in group g = c // 4W, window j, slot t; it copies x[g*L + 2j + t] when
    that position is inside the group and inside K, else it is zero.
    """
    lg = 4 * windows
    g = c // lg
    r = c - g * lg
    j = r // 4
    t = r - 4 * j
    within = 2 * j + t
    src = g * group + within
    valid = (within < group) & (src < k)
    return torch.where(valid, src, torch.full_like(src, -1))


try:  # Triton is optional at import time: CPU machines import this module for tests and fallbacks
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def _kernel():
    if triton is None:
        raise QuantSlideError("the Triton quant+slide kernel needs triton (use impl='torch' for the reference)")
    return _quant_slide_kernel


def _kernel_pairs():
    _kernel()
    return _quant_slide_pairs_kernel


if triton is not None:
    @triton.jit
    def _row_inv_scale(x_row, s_ptr, row, K, klim, MODE: tl.constexpr, QMAX: tl.constexpr,
                       FLOOR: tl.constexpr, BLOCK_K: tl.constexpr):
        """Pass 1: the row's amax -> store its scale, return qmax/amax (1.0 when not quantizing).
        The row is kept in L2 (evict_last) for pass 2's gathers."""
        inv = 1.0
        if MODE != 0:
            offs = tl.arange(0, BLOCK_K)
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs
                v = tl.load(x_row + kk, mask=kk < klim, other=0.0, eviction_policy="evict_last").to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            a = tl.maximum(tl.max(amax, 0), FLOOR)
            # torch evaluates qmax / amax as reciprocal(amax) * qmax: mirror it for identical codes
            inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), a) * QMAX
            tl.store(s_ptr + row, tl.math.div_rn(a, tl.full([], QMAX, tl.float32)))
        return inv

    @triton.jit
    def _quantize(v, inv, MODE: tl.constexpr, QMAX: tl.constexpr, OUT_TY: tl.constexpr):
        # MODE 0: no quantization (lift only); 1: int8; 2: fp8 e4m3
        if MODE == 1:
            y = v.to(tl.float32) * inv
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            # round half to even: adding 1.5 * 2**23 leaves no fraction bits in fp32
            y = (y + 12582912.0) - 12582912.0
            return y.to(tl.int8)
        elif MODE == 2:
            y = v.to(tl.float32) * inv
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            return y.to(OUT_TY)
        else:
            return v.to(OUT_TY)

    @triton.jit
    def _quant_slide_kernel(x_ptr, q_ptr, s_ptr, M, K, KQ, stride_xm, stride_qm,
                            GROUP: tl.constexpr, WINDOWS: tl.constexpr, IDENTITY: tl.constexpr,
                            MODE: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr):
        """One element per lane: the identity (quant-only, 2_4) path, and any input dtype/odd K."""
        row = tl.program_id(0)
        # padded rows (row >= M) read nothing, so they quantize to zeros
        klim = tl.where(row < M, K, 0)
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        q_row = q_ptr + row.to(tl.int64) * stride_qm
        inv = _row_inv_scale(x_row, s_ptr, row, K, klim, MODE, QMAX, FLOOR, BLOCK_K)
        cols = tl.arange(0, BLOCK_OUT)
        for c0 in range(0, KQ, BLOCK_OUT):
            c = c0 + cols
            if IDENTITY:
                src = c
                valid = c < klim
            else:
                LG: tl.constexpr = 4 * WINDOWS
                g = c // LG
                r = c - g * LG
                j = r // 4
                within = 2 * j + (r - 4 * j)
                src = g * GROUP + within
                valid = (within < GROUP) & (src < klim)
            v = tl.load(x_row + src, mask=valid, other=0.0, eviction_policy="evict_first")
            tl.store(q_row + c, _quantize(v, inv, MODE, QMAX, q_ptr.dtype.element_ty), mask=c < KQ)

    @triton.jit
    def _quant_slide_pairs_kernel(x_ptr, xw_ptr, q_ptr, s_ptr, M, K, KQ, stride_xm, stride_xwm, stride_qm,
                                  GROUP: tl.constexpr, WINDOWS: tl.constexpr, IS_BF16: tl.constexpr,
                                  MODE: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """The lifting gathers 32-bit words: every window starts at an even column, so it is two
        aligned (x[2i], x[2i+1]) pairs. Half the gather instructions of the one-element kernel."""
        row = tl.program_id(0)
        klim = tl.where(row < M, K, 0)
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        xw_row = xw_ptr + row.to(tl.int64) * stride_xwm
        q_row = q_ptr + row.to(tl.int64) * stride_qm
        inv = _row_inv_scale(x_row, s_ptr, row, K, klim, MODE, QMAX, FLOOR, BLOCK_K)
        PG: tl.constexpr = 2 * WINDOWS      # lifted pairs per group
        HALF: tl.constexpr = GROUP // 2     # source pairs per group
        kpairs = klim // 2
        pidx = tl.arange(0, BLOCK_P)
        cols = tl.arange(0, 2 * BLOCK_P)
        for p0 in range(0, KQ // 2, BLOCK_P):
            p = p0 + pidx
            g = p // PG
            r = p - g * PG
            j = r // 2
            within = j + (r - 2 * j)
            src = g * HALF + within
            w = tl.load(xw_row + src, mask=(within < HALF) & (src < kpairs), other=0, eviction_policy="evict_first")
            if IS_BF16:
                lo = (w << 16).to(tl.float32, bitcast=True)
                hi = (w & -65536).to(tl.float32, bitcast=True)
            else:
                lo = (w & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            out_ty = q_ptr.dtype.element_ty
            out = tl.interleave(_quantize(lo, inv, MODE, QMAX, out_ty), _quantize(hi, inv, MODE, QMAX, out_ty))
            c = 2 * p0 + cols
            tl.store(q_row + c, out, mask=c < KQ)


def _launch(x, pat: Pattern | None, act_dtype: str | None, k_align: int, m_align: int,
            out_dtype: torch.dtype | None, identity: bool):
    if x.dim() != 2:
        raise QuantSlideError(f"expected x of shape [M, K], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if identity:
        kq = -(-k // k_align) * k_align
        group, windows = 4, 1
    else:
        kq = padded_lifted_k(k, pat, k_align)
        group, windows = pat.group, pat.windows
    mp = -(-m // m_align) * m_align if m_align > 1 else m
    if act_dtype is None:
        qdt = out_dtype or x.dtype
        mode, qm = 0, 1.0
    else:
        name = dtype_name(act_dtype)
        qdt = DTYPES[name]
        mode, qm = (1 if name == "int8" else 2), qmax(name)
    q = torch.empty(mp, kq, dtype=qdt, device=x.device)
    s = torch.empty(mp, dtype=torch.float32, device=x.device)
    if mp == 0:
        return q, s
    # wide rows: 16 warps, so fewer rows are in flight and pass 2's re-reads still hit L2
    wide = k >= 8192
    block_k = 8192 if wide else (4096 if k >= 4096 else max(256, 1 << (k - 1).bit_length()))
    warps = 16 if wide else (8 if k >= 2048 else 4)
    common = dict(MODE=mode, QMAX=qm, FLOOR=AMAX_FLOOR, BLOCK_K=block_k, num_warps=warps)
    # 2_4's lift is the identity (K padded to 4), so it takes the contiguous path
    identity = identity or pat.L == 4
    pairs = (not identity and x.dtype in (torch.bfloat16, torch.float16) and k % 2 == 0
             and x.is_contiguous() and x.data_ptr() % 4 == 0)
    if pairs:
        xw = x.view(torch.int32)
        _kernel_pairs()[(mp,)](x, xw, q, s, m, k, kq, x.stride(0), xw.stride(0), q.stride(0),
                               GROUP=group, WINDOWS=windows, IS_BF16=x.dtype == torch.bfloat16,
                               BLOCK_P=2048 if wide else 1024, **common)
    else:
        _kernel()[(mp,)](x, q, s, m, k, kq, x.stride(0), q.stride(0), GROUP=group, WINDOWS=windows,
                         IDENTITY=identity, BLOCK_OUT=2048, **common)
    return q, s[:m]


def quant_slide(x: torch.Tensor, pat: Pattern | str, act_dtype: str | None, k_align: int = 1,
                m_align: int = 1, out_dtype: torch.dtype | None = None,
                impl: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (lifted x' [M_pad, K'_pad], s_tok [M] float32).

    act_dtype None: lift only (x' in out_dtype or x.dtype; s_tok is left unset).
    """
    pat = parse_pattern(pat)
    if impl == "torch":
        return _torch_impl(x, pat, act_dtype, k_align, m_align, out_dtype, identity=False)
    if impl != "triton":
        raise QuantSlideError(f"unknown impl {impl!r}: choose triton or torch")
    return _launch(x, pat, act_dtype, k_align, m_align, out_dtype, identity=False)


def quant_only(x: torch.Tensor, act_dtype: str, k_align: int = 1, m_align: int = 1,
               impl: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization without lifting (the dense path): x [M, K] -> (q [M_pad, K_pad], s [M])."""
    if impl == "torch":
        return _torch_impl(x, None, act_dtype, k_align, m_align, None, identity=True)
    if impl != "triton":
        raise QuantSlideError(f"unknown impl {impl!r}: choose triton or torch")
    return _launch(x, None, act_dtype, k_align, m_align, None, identity=True)


def _torch_impl(x, pat, act_dtype, k_align, m_align, out_dtype, identity):
    m = x.shape[0]
    if act_dtype is None:
        from ..pattern import lift
        q = lift(x, pat).to(out_dtype or x.dtype)
        s = torch.ones(m, dtype=torch.float32, device=x.device)
        pad = (-q.shape[1]) % k_align
        q = torch.nn.functional.pad(q, (0, pad)) if pad else q
    elif identity:
        q, s = reference.quant_ref(x, act_dtype)
        pad = (-q.shape[1]) % k_align
        if pad:
            q = torch.nn.functional.pad(q.float(), (0, pad)).to(q.dtype)
    else:
        q, s = reference.quant_slide_ref(x, pat, act_dtype, k_align)
    mp = -(-m // m_align) * m_align if m_align > 1 else m
    if mp > m:
        q = torch.cat([q, q.new_zeros(mp - m, q.shape[1])])
    return q.contiguous(), s
