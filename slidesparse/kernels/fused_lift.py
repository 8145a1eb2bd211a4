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
followed by core.quant.quantize_rows and core.pattern.lift. Each Triton program owns one row:
pass 1 the RMS statistics (and writes x + r), pass 2 the amax of the normalised row, pass 3
gathers each lifted column's source and quantizes it. Passes 2 and 3 re-read the row from L2, so
HBM sees the inputs once. Rows are padded to m_align and columns to k_align with zeros, as the
GEMMs want (kernels/quant_slide.py).

runtime/lift_fusion.py puts these in the producer's place in vLLM's post-grad graph; the custom
ops are registered here (torch.library, with fake implementations, no host sync).
"""

from __future__ import annotations

import torch

from ..core.pattern import Pattern, parse_pattern
from ..core.quant import AMAX_FLOOR, DTYPES, dtype_name, qmax
from .quant_slide import QuantSlideError, _torch_impl, padded_lifted_k, quant_slide

__all__ = ["rms_norm_ref", "add_rms_norm_ref", "silu_mul_ref", "rms_norm_quant_lift", "add_rms_norm_quant_lift",
           "silu_mul_quant_lift", "quant_lift"]

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
    """vLLM's fused_add_rms_norm IR op (native form): (rms_norm(x + r), x + r)."""
    h = x.float() + residual.float()
    y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y.to(weight.dtype) * weight
    return y.to(x.dtype), h.to(x.dtype)


def silu_mul_ref(t: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul.forward_native."""
    d = t.shape[-1] // 2
    return torch.nn.functional.silu(t[..., :d]) * t[..., d:]


def _quant_lift_torch(y: torch.Tensor, pat: Pattern, act_dtype: str, k_align: int, m_align: int):
    return _torch_impl(y, pat, act_dtype, k_align, m_align, None, identity=False)


# ----------------------------------------------------------------------------- Triton

if triton is not None:
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
        a = tl.maximum(tl.max(amax, 0), FLOOR)
        # torch evaluates qmax / amax as reciprocal(amax) * qmax: mirror it for identical codes
        inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), a) * QMAX
        tl.store(s_ptr + row, tl.math.div_rn(a, tl.full([], QMAX, tl.float32)))
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
            v = y * inv
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if MODE == 1:
                # round half to even: adding 1.5 * 2**23 leaves no fraction bits in fp32
                code = ((v + 12582912.0) - 12582912.0).to(tl.int8)
            else:
                code = v.to(q_ptr.dtype.element_ty)
            tl.store(q_row + c, code, mask=c < KQ)


def _launch(kind: int, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
            pat: Pattern, act_dtype: str, k_align: int, m_align: int):
    if triton is None:
        raise QuantSlideError("the fused producer kernels need triton (the torch definitions run on the CPU)")
    m = x.shape[0]
    k = x.shape[1] // 2 if kind == 2 else x.shape[1]
    kq = padded_lifted_k(k, pat, k_align)
    mp = -(-m // m_align) * m_align
    name = dtype_name(act_dtype)
    q = torch.empty(mp, kq, dtype=DTYPES[name], device=x.device)
    s = torch.empty(mp, dtype=torch.float32, device=x.device)
    ro = torch.empty_like(x) if kind == 1 else None
    if mp:
        x = x.contiguous()
        r = residual.contiguous() if residual is not None else x
        w = weight.contiguous() if weight is not None else x
        block_k = min(4096, max(256, triton.next_power_of_2(k)))
        warps = 16 if k >= 8192 else (8 if k >= 2048 else 4)
        _producer_quant_lift_kernel[(mp,)](
            x, r, w, ro if ro is not None else x, q, s, m, k, kq, x.stride(0), r.stride(0),
            ro.stride(0) if ro is not None else 0, q.stride(0), float(eps),
            KIND=kind, HAS_W=weight is not None, GROUP=pat.group, WINDOWS=pat.windows, INF=pat.L is None,
            MODE=1 if name == "int8" else 2, QMAX=qmax(name), FLOOR=AMAX_FLOOR, BLOCK_K=block_k, BLOCK_OUT=1024,
            num_warps=warps)
    return q, s[:m], ro


def _check(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise QuantSlideError(f"{what} expects [M, K] input, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantSlideError(f"{what} expects bf16/fp16/fp32 input, got {x.dtype}")


def _use_triton(x: torch.Tensor, impl: str | None) -> bool:
    if impl not in (None, "triton", "torch"):
        raise QuantSlideError(f"unknown impl {impl!r}: choose triton or torch")
    return impl == "triton" or (impl is None and x.is_cuda)


def rms_norm_quant_lift(x: torch.Tensor, weight: torch.Tensor | None, eps: float, pat: Pattern | str,
                        act_dtype: str, k_align: int = 1, m_align: int = 1, impl: str | None = None):
    """x [M, K] -> (x' [M_pad, K'_pad], s_tok [M]) of rms_norm(x, weight)."""
    pat = parse_pattern(pat)
    _check(x, "rms_norm_quant_lift")
    if _use_triton(x, impl):
        q, s, _ = _launch(0, x, None, weight, eps, pat, act_dtype, k_align, m_align)
        return q, s
    return _quant_lift_torch(rms_norm_ref(x, weight, eps), pat, act_dtype, k_align, m_align)


def add_rms_norm_quant_lift(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                            pat: Pattern | str, act_dtype: str, k_align: int = 1, m_align: int = 1,
                            impl: str | None = None):
    """x, residual [M, K] -> (x' [M_pad, K'_pad], s_tok [M], x + residual [M, K])."""
    pat = parse_pattern(pat)
    _check(x, "add_rms_norm_quant_lift")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise QuantSlideError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x "
                              f"{x.dtype} {tuple(x.shape)}")
    if _use_triton(x, impl):
        return _launch(1, x, residual, weight, eps, pat, act_dtype, k_align, m_align)
    y, h = add_rms_norm_ref(x, residual, weight, eps)
    q, s = _quant_lift_torch(y, pat, act_dtype, k_align, m_align)
    return q, s, h


def silu_mul_quant_lift(t: torch.Tensor, pat: Pattern | str, act_dtype: str, k_align: int = 1,
                        m_align: int = 1, impl: str | None = None):
    """t [M, 2d] -> (x' [M_pad, d'_pad], s_tok [M]) of silu(t[:, :d]) * t[:, d:]."""
    pat = parse_pattern(pat)
    _check(t, "silu_mul_quant_lift")
    if t.shape[1] % 2:
        raise QuantSlideError(f"silu_mul_quant_lift expects an even last dimension, got {t.shape[1]}")
    if _use_triton(t, impl):
        q, s, _ = _launch(2, t, None, None, 0.0, pat, act_dtype, k_align, m_align)
        return q, s
    return _quant_lift_torch(silu_mul_ref(t), pat, act_dtype, k_align, m_align)


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


@torch.library.custom_op("slidesparse::quant_lift", mutates_args=())
def quant_lift_op(x: torch.Tensor, sparsity: str, act_dtype: str, k_align: int,
                  m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_lift(x, sparsity, act_dtype, k_align, m_align)


@quant_lift_op.register_fake
def _(x, sparsity, act_dtype, k_align, m_align):
    return _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)


@torch.library.custom_op("slidesparse::rms_norm_quant_lift", mutates_args=())
def rms_norm_quant_lift_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float, sparsity: str, act_dtype: str,
                           k_align: int, m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_quant_lift(x, weight, eps, sparsity, act_dtype, k_align, m_align)


@rms_norm_quant_lift_op.register_fake
def _(x, weight, eps, sparsity, act_dtype, k_align, m_align):
    return _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)


@torch.library.custom_op("slidesparse::add_rms_norm_quant_lift", mutates_args=())
def add_rms_norm_quant_lift_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                               sparsity: str, act_dtype: str, k_align: int,
                               m_align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_rms_norm_quant_lift(x, residual, weight, eps, sparsity, act_dtype, k_align, m_align)


@add_rms_norm_quant_lift_op.register_fake
def _(x, residual, weight, eps, sparsity, act_dtype, k_align, m_align):
    q, s = _fake(x, x.shape[1], sparsity, act_dtype, k_align, m_align)
    return q, s, torch.empty_like(x)


@torch.library.custom_op("slidesparse::silu_mul_quant_lift", mutates_args=())
def silu_mul_quant_lift_op(t: torch.Tensor, sparsity: str, act_dtype: str, k_align: int,
                           m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return silu_mul_quant_lift(t, sparsity, act_dtype, k_align, m_align)


@silu_mul_quant_lift_op.register_fake
def _(t, sparsity, act_dtype, k_align, m_align):
    return _fake(t, t.shape[1] // 2, sparsity, act_dtype, k_align, m_align)
