"""Fused per-token quantization + activation lifting ("quant+slide"), and the quant-only variant.

    quant_slide(x [M, K], pattern, act_dtype) -> (x' [M_pad, K'_pad] int8 | fp8_e4m3, s_tok [M] fp32)

One program per row: pass 1 reads the row for its amax, pass 2 gathers the lifted columns (the
row is then in L1/L2, so HBM sees x once) and writes x' quantized. The math is exactly
slidesparse.quant (amax floor; qmax / amax the way torch evaluates it, reciprocal(amax) * qmax;
int8 round-half-even clamped to +-127; fp8 clamp to +-448 then round-to-nearest-even), so the
codes match the torch reference (the scale may differ from torch's CUDA division by 1 ulp).

Two gathers for the lifted patterns (_launch's `gather`; measured side by side by
tools/gpu_lift_gathers.py, docs/performance.md): "tile" (the default) loads a row as two
[groups, windows] tiles of 32-bit pairs, a window being pairs j and j+1 of its group, and reads
x once when the tiles hold the whole row; "elem" gathers one element per lane (any input dtype,
odd K). A flat gather of 32-bit pairs, measured in the same run, lost to "tile" and was removed.
2_4 and quant-only read contiguously.

Layout the GEMM needs: K' is zero-padded to `k_align` columns and M to `m_align` rows (cuSPARSELt
wants 8-bit dense operands in multiples of 16); padded rows are written as zeros, padded columns
too, so the buffer never holds garbage (an fp8 0x7f byte would be NaN).

Row offsets are formed in int64: M * K' passes 2**31 at M=65536, K'=32768.

With act_dtype=None the kernel only lifts (the BF16/FP16 sparse path), keeping x's values.
Quant-only (the dense path) is the identity lift: pattern 2_4 with no padding to a group.

`impl="torch"` computes the same with torch ops (under torch.compile the runtime traces
quant_only's, which Inductor fuses into the producer of x); it is never chosen silently.

lift_codes() lifts codes that are already quantized (1-byte moves of 2-byte pairs): the traced
layer's sparse buckets, where quantizing in x's shape lets Inductor keep one reduction kernel.
"""

from __future__ import annotations

import torch

from ..core.pattern import Pattern, lift, parse_pattern
from ..core.quant import AMAX_FLOOR, DTYPES, dtype_name, qmax, quantize_rows

__all__ = ["quant_slide", "quant_only", "lift_codes", "padded_lifted_k", "QuantSlideError"]


class QuantSlideError(ValueError):
    pass


def padded_lifted_k(k: int, pat: Pattern | str, k_align: int = 1) -> int:
    kp = parse_pattern(pat).lifted_k(k)
    return -(-kp // k_align) * k_align


try:  # Triton is optional at import time: CPU machines import this module for tests and fallbacks
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def _kernel():
    if triton is None:
        raise QuantSlideError("the Triton quant+slide kernel needs triton (use impl='torch' for the reference)")
    return _quant_slide_kernel


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
    def _quant_slide_tile_kernel(x_ptr, xw_ptr, q_ptr, s_ptr, M, K, KQ, NG, stride_xm, stride_xwm, stride_qm,
                                 HALF: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, IS_BF16: tl.constexpr,
                                 MODE: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
                                 BLOCK_K: tl.constexpr, G_BLK: tl.constexpr, ONE_PASS: tl.constexpr):
        """The lift as two [groups, windows] tiles of 32-bit pairs: window j of group g is pairs
        (g*HALF + j, g*HALF + j + 1), so tile A holds each window's first pair, tile B its second
        (B's loads hit the lines A just brought in). No index division. With ONE_PASS the whole
        row is one tile pair, its amax comes from the tiles, and x is read once; otherwise pass 1
        takes the amax and the tiles re-read the row from L2."""
        row = tl.program_id(0)
        klim = tl.where(row < M, K, 0)
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        xw_row = xw_ptr + row.to(tl.int64) * stride_xwm
        q_row = q_ptr + row.to(tl.int64) * stride_qm
        npairs = klim // 2
        gi = tl.arange(0, G_BLK)[:, None]
        ji = tl.arange(0, WP)[None, :]
        ci = tl.arange(0, 4 * WP)[None, :]
        out_ty = q_ptr.dtype.element_ty
        if not ONE_PASS:
            inv = _row_inv_scale(x_row, s_ptr, row, K, klim, MODE, QMAX, FLOOR, BLOCK_K)
        for g0 in range(0, NG, G_BLK):
            g = g0 + gi
            pa = g * HALF + ji
            ma = (ji < W) & (pa < npairs)
            # 2_inf (HALF 1): a window is [x0, x1, 0, 0], so its second pair is zero
            mb = ma & (ji + 1 < HALF) & (pa + 1 < npairs)
            a = tl.load(xw_row + pa, mask=ma, other=0, eviction_policy="evict_first")
            b = tl.load(xw_row + pa + 1, mask=mb, other=0, eviction_policy="evict_first")
            if IS_BF16:
                a_lo = (a << 16).to(tl.float32, bitcast=True)
                a_hi = (a & -65536).to(tl.float32, bitcast=True)
                b_lo = (b << 16).to(tl.float32, bitcast=True)
                b_hi = (b & -65536).to(tl.float32, bitcast=True)
            else:
                a_lo = (a & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                a_hi = (a >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                b_lo = (b & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                b_hi = (b >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            if ONE_PASS:
                inv = 1.0
                if MODE != 0:
                    am = tl.maximum(tl.maximum(tl.abs(a_lo), tl.abs(a_hi)), tl.maximum(tl.abs(b_lo), tl.abs(b_hi)))
                    amax = tl.maximum(tl.max(tl.max(am, 1), 0), FLOOR)
                    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), amax) * QMAX
                    tl.store(s_ptr + row, tl.math.div_rn(amax, tl.full([], QMAX, tl.float32)))
            # window bytes in order a_lo, a_hi, b_lo, b_hi: join pairs the last axis as [first, second]
            win = tl.join(tl.join(_quantize(a_lo, inv, MODE, QMAX, out_ty), _quantize(b_lo, inv, MODE, QMAX, out_ty)),
                          tl.join(_quantize(a_hi, inv, MODE, QMAX, out_ty), _quantize(b_hi, inv, MODE, QMAX, out_ty)))
            win = tl.reshape(win, (G_BLK, 4 * WP))
            tl.store(q_row + g * (4 * W) + ci, win, mask=(ci < 4 * W) & (g < NG))
        # the k_align columns past the last group
        tail = tl.arange(0, 64)
        for c0 in range(NG * 4 * W, KQ, 64):
            c = c0 + tail
            tl.store(q_row + c, tl.zeros([64], dtype=out_ty), mask=c < KQ)


def _launch(x, pat: Pattern | None, act_dtype: str | None, k_align: int, m_align: int,
            out_dtype: torch.dtype | None, identity: bool, gather: str = "tile"):
    """gather: how lifted patterns read x, "tile" (two [group, window] tiles of 32-bit pairs) or
    "elem" (one element per lane); the latter is kept for odd inputs, tests and benchmarks."""
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
    words = (not identity and x.dtype in (torch.bfloat16, torch.float16) and k % 2 == 0
             and x.is_contiguous() and x.data_ptr() % 4 == 0)
    if words and gather == "tile":
        xw = x.view(torch.int32)
        half, w = group // 2, windows
        wp = 1 << (w - 1).bit_length()
        ng = pat.num_groups(k)
        # one pass when the row's tiles fit in 4096 words per tile: x is then read once
        g_one = 1 << max(0, (ng - 1).bit_length())
        one = g_one * wp <= 4096
        g_blk = g_one if one else max(1, 2048 // wp)
        _kernel()
        _quant_slide_tile_kernel[(mp,)](x, xw, q, s, m, k, kq, ng, x.stride(0), xw.stride(0), q.stride(0),
                                        HALF=half, W=w, WP=wp, IS_BF16=x.dtype == torch.bfloat16,
                                        G_BLK=g_blk, ONE_PASS=one, **common)
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


def lift_codes(q: torch.Tensor, pat: Pattern | str, k_align: int = 1, m_align: int = 1,
               impl: str = "gpu") -> torch.Tensor:
    """Lift already-quantized codes: q [M, K] (1-byte, from quant_only) -> [M, K'_pad], the bytes
    quant_slide would have written (the scale is per row, so quantize-then-lift equals
    lift-then-quantize). The traced layer quantizes in x's shape, fused into x's producer, and
    lifts here only when the sparse GEMM runs; moving 1-byte codes costs half of re-reading x.
    Rows are zero-padded to m_align here, not by the quantization, whose output must keep x's
    shape for Inductor to write it from the same kernel that reduces the row.

    A window is two 2-byte pairs of codes, so the GPU kernels move int16 pairs. impl: "native"
    (SlideSparse's CUDA library, csrc/ss_lift.cu: a launch costs ~50 us less host time than a
    Triton launch from Python, which outside CUDA graphs is on the step's critical path),
    "triton", "gpu" (native where the library has it, else Triton), "torch" (the view-and-cat
    lift, also used for odd K)."""
    pat = parse_pattern(pat)
    if q.dim() != 2 or q.element_size() != 1:
        raise QuantSlideError(f"lift_codes expects 1-byte codes of shape [M, K], got {q.dtype} {tuple(q.shape)}")
    m, k = q.shape
    kq = padded_lifted_k(k, pat, k_align)
    mp = -(-m // m_align) * m_align
    if pat.L == 4 and kq == k and mp == m:
        return q
    if impl not in ("gpu", "native", "triton", "torch"):
        raise QuantSlideError(f"unknown impl {impl!r}: choose gpu, native, triton or torch")
    if impl == "torch" or k % 2:
        return _lift_pad(q.view(torch.uint8), pat, k_align, m_align).view(q.dtype)
    # the native kernel stores 16 bytes at a time: x' rows of a multiple of 16 (k_align is 64 for
    # both GEMMs)
    native = q.is_cuda and kq % 16 == 0 and _native_lift()
    if impl == "native" and not native:
        raise QuantSlideError("lift_codes(impl='native') needs a CUDA tensor, K' % 16 == 0 and SlideSparse's CUDA "
                              "library with its lift (bash tools/build_csrc.sh)")
    q = q.contiguous()
    out = torch.empty(mp, kq, dtype=q.dtype, device=q.device)
    if native and impl != "triton":
        if mp:
            from . import cutlass_sparse as cs
            cs.lift_into(q, out, m, pat.group // 2, pat.windows, pat.L is None)
        return out
    if triton is None:
        raise QuantSlideError("lift_codes(impl='triton') needs triton (use impl='torch')")
    if mp:
        src, dst = q.view(torch.int16), out.view(torch.int16)
        block_m, block_c = 8, 512
        grid = (triton.cdiv(kq // 2, block_c), triton.cdiv(mp, block_m))
        _lift_pairs_kernel[grid](src, dst, m, mp, k // 2, kq // 2, pat.num_groups(k), src.stride(0), dst.stride(0),
                                 P=pat.group // 2, W=pat.windows, INF=pat.L is None,
                                 BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return out


_NATIVE_LIFT: list[bool] = []


def _native_lift() -> bool:
    # asked once: the library is loaded (or found missing) once per process
    if not _NATIVE_LIFT:
        from . import cutlass_sparse as cs
        _NATIVE_LIFT.append(cs.lift_available())
    return _NATIVE_LIFT[0]


if triton is not None:
    @triton.jit
    def _lift_pairs_kernel(src_ptr, dst_ptr, M, MP, KP, KQP, NG, stride_s, stride_d,
                           P: tl.constexpr, W: tl.constexpr, INF: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """dst pair o = (group g, window j, half h) copies src pair g*P + j + h (2_inf: h = 1 is
        zero); pairs past K or past the last group, and rows M..MP, are zero (the padding)."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        o = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        g = o // (2 * W)
        r = o - g * (2 * W)
        j = r // 2
        h = r - 2 * j
        if INF:
            src = g * P + j
            ok = (h == 0) & (g < NG) & (src < KP)
        else:
            src = g * P + j + h
            ok = (g < NG) & (src < KP)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        v = tl.load(src_ptr + rows64[:, None] * stride_s + src[None, :],
                    mask=rmask[:, None] & ok[None, :], other=0)
        tl.store(dst_ptr + rows64[:, None] * stride_d + o[None, :], v,
                 mask=(rows < MP)[:, None] & (o < KQP)[None, :])


def _lift_pad(t: torch.Tensor, pat: Pattern | None, k_align: int, m_align: int) -> torch.Tensor:
    """lift() (pat None: none) then zero padding to k_align columns and m_align rows, as views, a
    cat and a pad. 2_4's lift is the identity when K fills its groups: keeping t's shape lets
    Inductor put a quantization in the same kernel as its amax."""
    m, k = t.shape
    if pat is not None and not (pat.L == 4 and k % 4 == 0):
        t = lift(t, pat)
    kpad = (-t.shape[1]) % k_align
    if kpad or m_align > 1:
        # no branch on the row padding itself: under torch.compile M is symbolic
        t = torch.nn.functional.pad(t, (0, kpad, 0, (-m) % m_align))
    return t


def _torch_impl(x, pat, act_dtype, k_align, m_align, out_dtype, identity):
    """The kernels' result as plain torch ops: core.quant.quantize_rows, then the lift and the
    padding of the codes (quantizing commutes with lifting: the scale is per row)."""
    lifted = None if identity else pat
    if act_dtype is None:
        return _lift_pad(x, lifted, k_align, m_align).to(out_dtype or x.dtype), \
            torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    q, s = quantize_rows(x, act_dtype)
    return _lift_pad(q.view(torch.uint8), lifted, k_align, m_align).view(q.dtype), s
