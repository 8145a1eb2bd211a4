"""Producer kernels that write the lifted codes: the lift pass folded into the kernel that makes x.

A lifted pattern (2_6, 2_8, 2_10, ...) needs x' [M, K'] (K' = gamma K) of per-token codes. The
traced layer used to get there in two kernels: Inductor's producer (RMSNorm, SiLU*mul) writing
codes [M, K], then a lift pass reading them back and writing x'. Here the producer writes x'
itself, so the activation side of a lifted linear moves what dense W8A8 moves plus the 0.5K of
duplicated columns (docs/performance.md has the byte accounting):

    rms_norm_quant_lift(x, w)            vLLM's rms_norm, then per-token quantization and the lift
    add_rms_norm_quant_lift(x, r, w)     vLLM's fused_add_rms_norm (also returns x + r), then the same
    silu_mul_quant_lift(t)               SiLU(t[:, :d]) * t[:, d:], then the same
    quant_lift(x)                        quantization and the lift of any x (kernels/quant_slide.py)

The math is the torch definitions below (`*_ref`), which are vLLM's native ops (vllm/ir/ops/
layernorm.py, SiluAndMul.forward_native: float32 statistics, bf16/fp16 roundings where they round)
followed by core.quant.quantize_rows and core.pattern.lift. x (or t) may also be given as the
previous lifted layer's cuSPARSELt accumulator with its scales (`Dequant`): its dequant pass,
which Inductor would have fused into the producer, then happens in the same kernel.

Each Triton program owns one row. `_tile_kernel` (bf16/fp16, even K) works on [groups, windows]
tiles of 32-bit pairs, as kernels/quant_slide.py's lift does: the whole row in one block where it
fits (the inputs are read once), else three sweeps (statistics, amax, codes) that re-read the
row from L2. `_producer_quant_lift_kernel` (any shape and float dtype) gathers one lifted column
per lane. Rows are padded to m_align and columns to k_align with zeros, as the GEMMs want. Both
compile without FMA contraction: a fused (acc * s_tok) * s_ch + bias rounds differently from the
graph's separate multiply and add, and x + r must be the graph's to the bit (it is the residual
stream). Measured on the H200 (docs/performance.md): both are slower than Inductor's producers,
which is why runtime/lift_fusion.py is opt-in.

runtime/lift_fusion.py puts these in the producer's place in vLLM's post-grad graph; the custom
ops are registered here (torch.library, with fake implementations, no host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.pattern import Pattern, parse_pattern
from ..core.quant import AMAX_FLOOR, DTYPES, dtype_name, qmax
from .quant_slide import QuantSlideError, _torch_impl, padded_lifted_k, quant_slide
from .library import op
from .reference import dequant_ref

__all__ = ["Dequant", "rms_norm_ref", "add_rms_norm_ref", "silu_mul_ref", "rms_norm_quant_lift",
           "add_rms_norm_quant_lift", "silu_mul_quant_lift", "quant_lift"]

try:  # Triton is optional at import time (CPU machines run the torch definitions)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# ----------------------------------------------------------------------------- definitions

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """vLLM's rms_norm IR op (native form)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y.to(weight.dtype) * weight
    return y.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_add_rms_norm IR op (native form): (rms_norm(x + r), x + r), the sum in fp32."""
    h = x.float() + residual.float()
    return rms_norm_ref(h, weight, eps).to(x.dtype), h.to(x.dtype)


def silu_mul_ref(t: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul.forward_native."""
    d = t.shape[-1] // 2
    return torch.nn.functional.silu(t[..., :d]) * t[..., d:]


def _quant_lift_torch(y: torch.Tensor, pat: Pattern, act_dtype: str, k_align: int, m_align: int):
    return _torch_impl(y, pat, act_dtype, k_align, m_align, None, identity=False)


# ----------------------------------------------------------------------------- Triton

if triton is not None:
    from .quant_slide import _quantize

    @triton.jit
    def _store_scale(amax, s_ptr, row, QMAX: tl.constexpr, FLOOR: tl.constexpr):
        """Store the row's scale amax / qmax; return qmax / amax as torch evaluates it
        (reciprocal(amax) * qmax), so the codes are identical."""
        a = tl.maximum(amax, FLOOR)
        tl.store(s_ptr + row, tl.math.div_rn(a, tl.full([], QMAX, tl.float32)))
        return tl.math.div_rn(tl.full([], 1.0, tl.float32), a) * QMAX

    @triton.jit
    def _produce(x_row, r_row, w_ptr, idx, mask, rstd, K, KIND: tl.constexpr, HAS_W: tl.constexpr):
        """The producer's output (float32 holding a value of x's dtype) at columns idx."""
        xt = x_row.dtype.element_ty
        if KIND == 2:  # silu(g) * u, each rounded to x's dtype as the eager ops round
            g = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_row + K + idx, mask=mask, other=0.0).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(xt).to(tl.float32)
            y = a * u
        else:
            h = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            if KIND == 1:
                h += tl.load(r_row + idx, mask=mask, other=0.0).to(tl.float32)
            y = h * rstd
            if HAS_W:
                wt = w_ptr.dtype.element_ty
                y = y.to(wt).to(tl.float32) * tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                y = y.to(wt).to(tl.float32)
        return y.to(xt).to(tl.float32)

    @triton.jit
    def _producer_quant_lift_kernel(x_ptr, r_ptr, w_ptr, ro_ptr, q_ptr, s_ptr, M, K, KQ,
                                    stride_x, stride_r, stride_ro, stride_q, eps,
                                    KIND: tl.constexpr, HAS_W: tl.constexpr, GROUP: tl.constexpr,
                                    WINDOWS: tl.constexpr, INF: tl.constexpr, MODE: tl.constexpr,
                                    QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK_K: tl.constexpr,
                                    BLOCK_OUT: tl.constexpr):
        """KIND 0: rms_norm(x); 1: rms_norm(x + r), storing x + r to ro; 2: silu(x[:, :K]) * x[:, K:].
        MODE 1: int8; 2: fp8 e4m3. Rows M..grid are padding: every load is masked, codes are 0."""
        row = tl.program_id(0)
        klim = tl.where(row < M, K, 0)
        row64 = row.to(tl.int64)
        x_row = x_ptr + row64 * stride_x
        r_row = r_ptr + row64 * stride_r
        q_row = q_ptr + row64 * stride_q
        offs = tl.arange(0, BLOCK_K)
        rstd = 1.0
        if KIND != 2:
            ssq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs
                m = kk < klim
                h = tl.load(x_row + kk, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
                if KIND == 1:
                    h += tl.load(r_row + kk, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
                    tl.store(ro_ptr + row64 * stride_ro + kk, h.to(ro_ptr.dtype.element_ty), mask=m)
                ssq += h * h
            rstd = tl.math.rsqrt(tl.sum(ssq, 0) / K + eps)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs
            y = _produce(x_row, r_row, w_ptr, kk, kk < klim, rstd, K, KIND, HAS_W)
            amax = tl.maximum(amax, tl.abs(y))
        inv = _store_scale(tl.max(amax, 0), s_ptr, row, QMAX, FLOOR)
        cols = tl.arange(0, BLOCK_OUT)
        LG: tl.constexpr = 4 * WINDOWS
        for c0 in range(0, KQ, BLOCK_OUT):
            c = c0 + cols
            g = c // LG
            r = c - g * LG
            j = r // 4
            t = r - 4 * j
            if INF:  # 2_inf: a window is [x0, x1, 0, 0]
                within = t
                ok = t < 2
            else:
                within = 2 * j + t
                ok = within < GROUP
            src = g * GROUP + within
            valid = ok & (src < klim)
            y = _produce(x_row, r_row, w_ptr, src, valid, rstd, K, KIND, HAS_W)
            tl.store(q_row + c, _quantize(y, inv, MODE, QMAX, q_ptr.dtype.element_ty), mask=c < KQ)


if triton is not None:
    @triton.jit
    def _pairs(ptr, pa, m, IS_BF16: tl.constexpr):
        """32-bit words at pair indices pa (masked) -> (lo, hi) as float32."""
        w = tl.load(ptr + pa, mask=m, other=0)
        if IS_BF16:
            return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
        lo = (w & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _input_pair(xw_row, acc_row, st, sc_ptr, b_ptr, pa, off, m, DEQ: tl.constexpr, HAS_B: tl.constexpr,
                    IS_BF16: tl.constexpr, XT: tl.constexpr):
        """The producer's input x at pairs pa (+ off pairs: SiLU*mul's second half), as float32 lo/hi
        values of x's dtype. DEQ: x is the previous GEMM's dequantized accumulator, computed here
        as the unfused graph computes it: acc * s_tok * s_ch (+ bias) in float32, rounded to XT."""
        if DEQ:
            lo, hi = _pairs(acc_row, pa + off, m, IS_BF16)
            c = 2 * (pa + off)
            lo = lo * st * tl.load(sc_ptr + c, mask=m, other=0.0)
            hi = hi * st * tl.load(sc_ptr + c + 1, mask=m, other=0.0)
            if HAS_B:
                lo += tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
                hi += tl.load(b_ptr + c + 1, mask=m, other=0.0).to(tl.float32)
            return lo.to(XT).to(tl.float32), hi.to(XT).to(tl.float32)
        return _pairs(xw_row, pa + off, m, IS_BF16)

    @triton.jit
    def _finish(h_lo, h_hi, u_lo, u_hi, w_row, pa, m, rstd, KIND: tl.constexpr, HAS_W: tl.constexpr,
                IS_BF16: tl.constexpr, XT: tl.constexpr):
        """Producer output (float32 holding XT values) from its input pairs h (x or x + r; SiLU*mul:
        the gate) and u (SiLU*mul's up half)."""
        if KIND == 2:
            a_lo = (h_lo / (1.0 + tl.exp(-h_lo))).to(XT).to(tl.float32)
            a_hi = (h_hi / (1.0 + tl.exp(-h_hi))).to(XT).to(tl.float32)
            return (a_lo * u_lo).to(XT).to(tl.float32), (a_hi * u_hi).to(XT).to(tl.float32)
        y_lo = h_lo * rstd
        y_hi = h_hi * rstd
        if HAS_W:
            w_lo, w_hi = _pairs(w_row, pa, m, IS_BF16)
            y_lo = (y_lo.to(XT).to(tl.float32) * w_lo).to(XT)
            y_hi = (y_hi.to(XT).to(tl.float32) * w_hi).to(XT)
        return y_lo.to(XT).to(tl.float32), y_hi.to(XT).to(tl.float32)

    @triton.jit
    def _block_inputs(xw_row, rw_row, acc_row, ro_row, st, sc_ptr, b_ptr, pa, ma, mb, last, off,
                      KIND: tl.constexpr, DEQ: tl.constexpr, HAS_B: tl.constexpr, IS_BF16: tl.constexpr,
                      XT: tl.constexpr, STORE_RES: tl.constexpr):
        """One block's producer inputs at tile A (pairs pa, mask ma) and B (pa + 1, mask mb): h (x,
        or x + r, stored to ro where STORE_RES: all of A and B's `last` pairs; SiLU*mul: the gate)
        and u (SiLU*mul's up half; h again for the norm kinds, which do not read it)."""
        a_lo, a_hi = _input_pair(xw_row, acc_row, st, sc_ptr, b_ptr, pa, 0, ma, DEQ, HAS_B, IS_BF16, XT)
        b_lo, b_hi = _input_pair(xw_row, acc_row, st, sc_ptr, b_ptr, pa + 1, 0, mb, DEQ, HAS_B, IS_BF16, XT)
        if KIND == 2:
            ua_lo, ua_hi = _input_pair(xw_row, acc_row, st, sc_ptr, b_ptr, pa, off, ma, DEQ, HAS_B, IS_BF16, XT)
            ub_lo, ub_hi = _input_pair(xw_row, acc_row, st, sc_ptr, b_ptr, pa + 1, off, mb, DEQ, HAS_B, IS_BF16, XT)
        else:
            if KIND == 1:
                ra_lo, ra_hi = _pairs(rw_row, pa, ma, IS_BF16)
                rb_lo, rb_hi = _pairs(rw_row, pa + 1, mb, IS_BF16)
                a_lo += ra_lo
                a_hi += ra_hi
                b_lo += rb_lo
                b_hi += rb_hi
                if STORE_RES:
                    tl.store(ro_row + 2 * pa, a_lo.to(XT), mask=ma)
                    tl.store(ro_row + 2 * pa + 1, a_hi.to(XT), mask=ma)
                    tl.store(ro_row + 2 * pa + 2, b_lo.to(XT), mask=last)
                    tl.store(ro_row + 2 * pa + 3, b_hi.to(XT), mask=last)
            ua_lo, ua_hi, ub_lo, ub_hi = a_lo, a_hi, b_lo, b_hi
        return a_lo, a_hi, b_lo, b_hi, ua_lo, ua_hi, ub_lo, ub_hi

    @triton.jit
    def _store_windows(q_row, g, ci, ya_lo, ya_hi, yb_lo, yb_hi, inv, NG, W: tl.constexpr, WP: tl.constexpr,
                       G_BLK: tl.constexpr, MODE: tl.constexpr, QMAX: tl.constexpr):
        """Codes of one block's windows, bytes a_lo, a_hi, b_lo, b_hi (join pairs the last axis as
        [first, second]), stored at group g's 4 * W lifted columns."""
        out_ty = q_row.dtype.element_ty
        win = tl.join(tl.join(_quantize(ya_lo, inv, MODE, QMAX, out_ty), _quantize(yb_lo, inv, MODE, QMAX, out_ty)),
                      tl.join(_quantize(ya_hi, inv, MODE, QMAX, out_ty), _quantize(yb_hi, inv, MODE, QMAX, out_ty)))
        tl.store(q_row + g * (4 * W) + ci, tl.reshape(win, (G_BLK, 4 * WP)), mask=(ci < 4 * W) & (g < NG))

    @triton.jit
    def _tile_kernel(xw_ptr, rw_ptr, ww_ptr, ro_ptr, acc_ptr, st_ptr, sc_ptr, b_ptr, q_ptr, s_ptr,
                     M, K, KQ, NG, stride_x, stride_r, stride_ro, stride_acc, stride_q, eps,
                     KIND: tl.constexpr, HAS_W: tl.constexpr, DEQ: tl.constexpr, HAS_B: tl.constexpr,
                     HALF: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, IS_BF16: tl.constexpr, MODE: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr,
                     G_BLK: tl.constexpr, ONE_BLOCK: tl.constexpr):
        """The producer, quantization and lift of one row, on [groups, windows] tiles of 32-bit
        pairs (kernels/quant_slide.py's layout): window j of group g is pairs (g*HALF + j, +1), tile
        A holding each window's first pair, B its second. Every element is counted once in the
        statistics: all of A, and B's last window (the group's last pair). ONE_BLOCK: the row's
        tiles are one block, loaded once; otherwise the statistics, the amax and the writes each
        loop over the blocks, re-reading the row from L2."""
        row = tl.program_id(0)
        klim = tl.where(row < M, K, 0)
        npairs = klim // 2
        row64 = row.to(tl.int64)
        xw_row = xw_ptr + row64 * stride_x
        rw_row = rw_ptr + row64 * stride_r
        acc_row = acc_ptr + row64 * stride_acc
        ro_row = ro_ptr + row64 * stride_ro
        q_row = q_ptr + row64 * stride_q
        XT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
        st = 1.0
        if DEQ:
            st = tl.load(st_ptr + tl.minimum(row, M - 1))
        gi = tl.arange(0, G_BLK)[:, None]
        ji = tl.arange(0, WP)[None, :]
        ci = tl.arange(0, 4 * WP)[None, :]
        off = K // 2  # SiLU*mul: the up half starts K columns (K/2 pairs) into the row
        rstd = 1.0
        amax = tl.zeros([G_BLK, WP], dtype=tl.float32)
        ssq = tl.zeros([G_BLK, WP], dtype=tl.float32)
        if ONE_BLOCK:
            pa = gi * HALF + ji
            ma = (ji < W) & (pa < npairs)
            mb = ma & (ji + 1 < HALF) & (pa + 1 < npairs)
            last = mb & (ji == W - 1)  # B's pair that A does not hold
            a_lo, a_hi, b_lo, b_hi, ua_lo, ua_hi, ub_lo, ub_hi = _block_inputs(
                xw_row, rw_row, acc_row, ro_row, st, sc_ptr, b_ptr, pa, ma, mb, last, off, KIND, DEQ, HAS_B, IS_BF16,
                XT, True)
            if KIND != 2:
                ssq = a_lo * a_lo + a_hi * a_hi + tl.where(last, b_lo * b_lo + b_hi * b_hi, 0.0)
                rstd = tl.math.rsqrt(tl.sum(tl.sum(ssq, 1), 0) / K + eps)
            ya_lo, ya_hi = _finish(a_lo, a_hi, ua_lo, ua_hi, ww_ptr, pa, ma, rstd, KIND, HAS_W, IS_BF16, XT)
            yb_lo, yb_hi = _finish(b_lo, b_hi, ub_lo, ub_hi, ww_ptr, pa + 1, mb, rstd, KIND, HAS_W, IS_BF16, XT)
            amax = tl.maximum(tl.abs(ya_lo), tl.abs(ya_hi))
            amax = tl.maximum(amax, tl.where(last, tl.maximum(tl.abs(yb_lo), tl.abs(yb_hi)), 0.0))
            inv = _store_scale(tl.max(tl.max(amax, 1), 0), s_ptr, row, QMAX, FLOOR)
            _store_windows(q_row, gi, ci, ya_lo, ya_hi, yb_lo, yb_hi, inv, NG, W, WP, G_BLK, MODE, QMAX)
        else:
            if KIND != 2:
                for g0 in range(0, NG, G_BLK):
                    pa = (g0 + gi) * HALF + ji
                    ma = (ji < W) & (pa < npairs)
                    last = ma & (ji + 1 < HALF) & (pa + 1 < npairs) & (ji == W - 1)
                    # B is only needed for its last pair here: load just that one
                    a_lo, a_hi, b_lo, b_hi, _, _, _, _ = _block_inputs(
                        xw_row, rw_row, acc_row, ro_row, st, sc_ptr, b_ptr, pa, ma, last, last, off, KIND, DEQ,
                        HAS_B, IS_BF16, XT, True)
                    ssq += a_lo * a_lo + a_hi * a_hi + tl.where(last, b_lo * b_lo + b_hi * b_hi, 0.0)
                rstd = tl.math.rsqrt(tl.sum(tl.sum(ssq, 1), 0) / K + eps)
            # the amax, then the codes: two sweeps (the second re-reads the row from L2). With a
            # residual, h = x + r is re-formed from x and r: the stored x + r is rounded
            for sweep in tl.static_range(2):
                if sweep == 1:
                    inv = _store_scale(tl.max(tl.max(amax, 1), 0), s_ptr, row, QMAX, FLOOR)
                for g0 in range(0, NG, G_BLK):
                    g = g0 + gi
                    pa = g * HALF + ji
                    ma = (ji < W) & (pa < npairs)
                    mb = ma & (ji + 1 < HALF) & (pa + 1 < npairs)
                    last = mb & (ji == W - 1)
                    a_lo, a_hi, b_lo, b_hi, ua_lo, ua_hi, ub_lo, ub_hi = _block_inputs(
                        xw_row, rw_row, acc_row, ro_row, st, sc_ptr, b_ptr, pa, ma, mb, last, off, KIND, DEQ, HAS_B,
                        IS_BF16, XT, False)
                    ya_lo, ya_hi = _finish(a_lo, a_hi, ua_lo, ua_hi, ww_ptr, pa, ma, rstd, KIND, HAS_W, IS_BF16, XT)
                    yb_lo, yb_hi = _finish(b_lo, b_hi, ub_lo, ub_hi, ww_ptr, pa + 1, mb, rstd, KIND, HAS_W,
                                           IS_BF16, XT)
                    if sweep == 0:
                        amax = tl.maximum(amax, tl.maximum(tl.abs(ya_lo), tl.abs(ya_hi)))
                        amax = tl.maximum(amax, tl.where(last, tl.maximum(tl.abs(yb_lo), tl.abs(yb_hi)), 0.0))
                    else:
                        _store_windows(q_row, g, ci, ya_lo, ya_hi, yb_lo, yb_hi, inv, NG, W, WP, G_BLK, MODE, QMAX)
        # the k_align columns past the last group
        tail = tl.arange(0, 64)
        for c0 in range(NG * 4 * W, KQ, 64):
            c = c0 + tail
            tl.store(q_row + c, tl.zeros([64], dtype=q_ptr.dtype.element_ty), mask=c < KQ)


class Dequant(NamedTuple):
    """x as the previous GEMM left it: acc [M_pad, N_pad] (unscaled, bf16), to be read as
    acc[:M, :n] * s_tok[m] * s_ch[n] (+ bias[n]) in float32, rounded to out_dtype."""
    acc: torch.Tensor
    s_tok: torch.Tensor
    s_ch: torch.Tensor
    bias: torch.Tensor | None
    n: int
    out_dtype: torch.dtype

    def value(self) -> torch.Tensor:
        m = self.s_tok.shape[0]
        return dequant_ref(self.acc[:m, :self.n], self.s_tok, self.s_ch, self.bias, self.out_dtype)


def _tile_ok(src: torch.Tensor, k: int, others) -> bool:
    return (k % 2 == 0 and src.dtype in (torch.bfloat16, torch.float16) and src.is_contiguous()
            and src.data_ptr() % 4 == 0 and src.stride(0) % 2 == 0
            and all(t is None or (t.dtype == src.dtype and t.is_contiguous() and t.data_ptr() % 4 == 0) for t in others))


def _launch(kind: int, x: torch.Tensor | Dequant, residual: torch.Tensor | None, weight: torch.Tensor | None,
            eps: float, pat: Pattern, act_dtype: str, k_align: int, m_align: int):
    """kind 0: rms_norm(x); 1: rms_norm(x + r) and x + r; 2: silu(x[:, :K]) * x[:, K:]."""
    if triton is None:
        raise QuantSlideError("the fused producer kernels need triton (the torch definitions run on the CPU)")
    deq = x if isinstance(x, Dequant) else None
    src = deq.acc if deq is not None else x
    xdt = deq.out_dtype if deq is not None else x.dtype
    m = deq.s_tok.shape[0] if deq is not None else x.shape[0]
    width = deq.n if deq is not None else x.shape[1]
    k = width // 2 if kind == 2 else width
    kq = padded_lifted_k(k, pat, k_align)
    mp = -(-m // m_align) * m_align
    name = dtype_name(act_dtype)
    q = torch.empty(mp, kq, dtype=DTYPES[name], device=src.device)
    s = torch.empty(mp, dtype=torch.float32, device=src.device)
    ro = torch.empty(m, k, dtype=xdt, device=src.device) if kind == 1 else None
    if mp == 0:
        return q, s[:m], ro
    common = dict(KIND=kind, MODE=1 if name == "int8" else 2, QMAX=qmax(name), FLOOR=AMAX_FLOOR)
    if _tile_ok(src, k, (residual, weight)) and (deq is None or (deq.acc.dtype == deq.out_dtype and deq.n % 2 == 0
                                                                and deq.s_ch.is_contiguous())):
        half, w_n = pat.group // 2, pat.windows
        wp = 1 << (w_n - 1).bit_length()
        ng = pat.num_groups(k)
        g_one = 1 << max(0, (ng - 1).bit_length())
        one = g_one * wp <= 2048
        g_blk = g_one if one else max(1, 1024 // wp)
        words = src.view(torch.int32)
        r = residual.contiguous().view(torch.int32) if residual is not None else words
        w = weight.contiguous().view(torch.int32) if weight is not None else words
        sc = deq.s_ch if deq is not None else s
        st = deq.s_tok.contiguous() if deq is not None else s
        b = deq.bias.contiguous() if deq is not None and deq.bias is not None else sc
        _tile_kernel[(mp,)](
            words, r, w, ro if ro is not None else src, words, st, sc, b, q, s,
            m, k, kq, ng, words.stride(0), r.stride(0), ro.stride(0) if ro is not None else 0, words.stride(0),
            q.stride(0), float(eps), HAS_W=weight is not None, DEQ=deq is not None,
            HAS_B=deq is not None and deq.bias is not None, HALF=half, W=w_n, WP=wp,
            IS_BF16=xdt == torch.bfloat16, G_BLK=g_blk, ONE_BLOCK=one,
            num_warps=8 if g_blk * wp >= 1024 else 4, enable_fp_fusion=False, **common)
        return q, s[:m], ro
    # odd shapes: one element per lane, from a materialised x
    x = deq.value() if deq is not None else x.contiguous()
    rr = residual.contiguous() if residual is not None else x
    ww = weight.contiguous() if weight is not None else x
    block_k = min(4096, max(256, triton.next_power_of_2(k)))
    _producer_quant_lift_kernel[(mp,)](
        x, rr, ww, ro if ro is not None else x, q, s, m, k, kq, x.stride(0), rr.stride(0),
        ro.stride(0) if ro is not None else 0, q.stride(0), float(eps),
        HAS_W=weight is not None, GROUP=pat.group, WINDOWS=pat.windows, INF=pat.L is None, BLOCK_K=block_k,
        BLOCK_OUT=1024, num_warps=16 if k >= 8192 else (8 if k >= 2048 else 4), enable_fp_fusion=False, **common)
    return q, s[:m], ro


def _check(x: torch.Tensor | Dequant, what: str) -> tuple[int, int]:
    """x's (M, width): a 2-D float tensor or the dequantized accumulator of a GEMM."""
    if isinstance(x, Dequant):
        if x.acc.dim() != 2 or x.acc.shape[1] < x.n or x.acc.shape[0] < x.s_tok.shape[0]:
            raise QuantSlideError(f"{what}: accumulator {tuple(x.acc.shape)} does not hold "
                                  f"[{x.s_tok.shape[0]}, {x.n}]")
        return x.s_tok.shape[0], x.n
    if x.dim() != 2:
        raise QuantSlideError(f"{what} expects [M, K] input, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantSlideError(f"{what} expects bf16/fp16/fp32 input, got {x.dtype}")
    return tuple(x.shape)


def _use_triton(x: torch.Tensor | Dequant, impl: str | None) -> bool:
    if impl not in (None, "triton", "torch"):
        raise QuantSlideError(f"unknown impl {impl!r}: choose triton or torch")
    t = x.acc if isinstance(x, Dequant) else x
    return impl == "triton" or (impl is None and t.is_cuda)


def _value(x: torch.Tensor | Dequant) -> torch.Tensor:
    return x.value() if isinstance(x, Dequant) else x


def rms_norm_quant_lift(x: torch.Tensor, weight: torch.Tensor | None, eps: float, pat: Pattern | str,
                        act_dtype: str, k_align: int = 1, m_align: int = 1, impl: str | None = None):
    """x [M, K] -> (x' [M_pad, K'_pad], s_tok [M]) of rms_norm(x, weight)."""
    pat = parse_pattern(pat)
    _check(x, "rms_norm_quant_lift")
    if _use_triton(x, impl):
        q, s, _ = _launch(0, x, None, weight, eps, pat, act_dtype, k_align, m_align)
        return q, s
    return _quant_lift_torch(rms_norm_ref(x, weight, eps), pat, act_dtype, k_align, m_align)


def add_rms_norm_quant_lift(x: torch.Tensor | Dequant, residual: torch.Tensor, weight: torch.Tensor | None,
                            eps: float, pat: Pattern | str, act_dtype: str, k_align: int = 1, m_align: int = 1,
                            impl: str | None = None):
    """x, residual [M, K] -> (x' [M_pad, K'_pad], s_tok [M], x + residual [M, K]). x may be the
    previous GEMM's accumulator (Dequant): its dequant pass then happens here too."""
    pat = parse_pattern(pat)
    shape = _check(x, "add_rms_norm_quant_lift")
    xdt = x.out_dtype if isinstance(x, Dequant) else x.dtype
    if tuple(residual.shape) != tuple(shape) or residual.dtype != xdt:
        raise QuantSlideError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x "
                              f"{xdt} {tuple(shape)}")
    if _use_triton(x, impl):
        return _launch(1, x, residual, weight, eps, pat, act_dtype, k_align, m_align)
    y, h = add_rms_norm_ref(_value(x), residual, weight, eps)
    q, s = _quant_lift_torch(y, pat, act_dtype, k_align, m_align)
    return q, s, h


def silu_mul_quant_lift(t: torch.Tensor | Dequant, pat: Pattern | str, act_dtype: str, k_align: int = 1,
                        m_align: int = 1, impl: str | None = None):
    """t [M, 2d] -> (x' [M_pad, d'_pad], s_tok [M]) of silu(t[:, :d]) * t[:, d:]; t may be the
    previous GEMM's accumulator (Dequant)."""
    pat = parse_pattern(pat)
    _, width = _check(t, "silu_mul_quant_lift")
    if width % 2:
        raise QuantSlideError(f"silu_mul_quant_lift expects an even last dimension, got {width}")
    if _use_triton(t, impl):
        q, s, _ = _launch(2, t, None, None, 0.0, pat, act_dtype, k_align, m_align)
        return q, s
    return _quant_lift_torch(silu_mul_ref(_value(t)), pat, act_dtype, k_align, m_align)


def quant_lift(x: torch.Tensor, pat: Pattern | str, act_dtype: str, k_align: int = 1, m_align: int = 1,
               impl: str | None = None):
    """x [M, K] -> (x' [M_pad, K'_pad], s_tok [M]): the quant+slide kernel (no producer to fuse)."""
    pat = parse_pattern(pat)
    _check(x, "quant_lift")
    if _use_triton(x, impl):
        return quant_slide(x, pat, act_dtype, k_align, m_align)
    return _quant_lift_torch(x, pat, act_dtype, k_align, m_align)


# ----------------------------------------------------------------------------- the custom ops

def _fake(x: torch.Tensor, k: int, sparsity: str, act_dtype: str, k_align: int, m_align: int):
    m = x.shape[0]
    mp = (m + m_align - 1) // m_align * m_align
    q = x.new_empty(mp, padded_lifted_k(k, sparsity, k_align), dtype=DTYPES[dtype_name(act_dtype)])
    return q, x.new_empty(m, dtype=torch.float32)


@op("slidesparse::quant_lift")
def quant_lift_op(x: torch.Tensor, sparsity: str, act_dtype: str, k_align: int,
                  m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_lift(x, sparsity, act_dtype, k_align, m_align)


@quant_lift_op.register_fake
def _(x, sparsity, act_dtype, k_align, m_align):
    return _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)


@op("slidesparse::rms_norm_quant_lift")
def rms_norm_quant_lift_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float, sparsity: str, act_dtype: str,
                           k_align: int, m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_quant_lift(x, weight, eps, sparsity, act_dtype, k_align, m_align)


@rms_norm_quant_lift_op.register_fake
def _(x, weight, eps, sparsity, act_dtype, k_align, m_align):
    return _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)


@op("slidesparse::add_rms_norm_quant_lift")
def add_rms_norm_quant_lift_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                               sparsity: str, act_dtype: str, k_align: int,
                               m_align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_rms_norm_quant_lift(x, residual, weight, eps, sparsity, act_dtype, k_align, m_align)


@add_rms_norm_quant_lift_op.register_fake
def _(x, residual, weight, eps, sparsity, act_dtype, k_align, m_align):
    q, s = _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)
    return q, s, torch.empty_like(x)


@op("slidesparse::silu_mul_quant_lift")
def silu_mul_quant_lift_op(t: torch.Tensor, sparsity: str, act_dtype: str, k_align: int,
                           m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return silu_mul_quant_lift(t, sparsity, act_dtype, k_align, m_align)


@silu_mul_quant_lift_op.register_fake
def _(t, sparsity, act_dtype, k_align, m_align):
    return _fake(t, t.shape[1] // 2, sparsity, act_dtype, k_align, m_align)


@op("slidesparse::dequant_add_rms_norm_quant_lift")
def dequant_add_rms_norm_quant_lift_op(acc: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor,
                                       bias: torch.Tensor | None, n: int, out_dtype: torch.dtype,
                                       residual: torch.Tensor, weight: torch.Tensor | None, eps: float, sparsity: str,
                                       act_dtype: str, k_align: int,
                                       m_align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_rms_norm_quant_lift(Dequant(acc, s_tok, s_ch, bias, n, out_dtype), residual, weight, eps, sparsity,
                                   act_dtype, k_align, m_align)


@dequant_add_rms_norm_quant_lift_op.register_fake
def _(acc, s_tok, s_ch, bias, n, out_dtype, residual, weight, eps, sparsity, act_dtype, k_align, m_align):
    q, s = _fake(residual, n, sparsity, act_dtype, k_align, m_align)
    return q, s, torch.empty_like(residual)


@op("slidesparse::dequant_silu_mul_quant_lift")
def dequant_silu_mul_quant_lift_op(acc: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor,
                                   bias: torch.Tensor | None, n: int, out_dtype: torch.dtype, sparsity: str,
                                   act_dtype: str, k_align: int, m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return silu_mul_quant_lift(Dequant(acc, s_tok, s_ch, bias, n, out_dtype), sparsity, act_dtype, k_align, m_align)


@dequant_silu_mul_quant_lift_op.register_fake
def _(acc, s_tok, s_ch, bias, n, out_dtype, sparsity, act_dtype, k_align, m_align):
    return _fake(s_tok, n // 2, sparsity, act_dtype, k_align, m_align)
