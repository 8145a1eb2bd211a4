"""Pure-torch references for the SlideSparse linear: the definitions the GPU kernels must match.

    quant_slide_ref:  x [M, K] (bf16/fp16/fp32) -> lifted, per-token quantized x' [M, K'pad], s_tok [M]
    dequant_ref:      acc [M, N] (fp32/int32)    -> acc * s_tok[m] * s_ch[n] + bias[n], in out dtype
    linear_ref:       the whole layer through the dense equivalent of the lifted product

Lifting commutes with per-token quantization (it only copies values of a row, so the row's amax
and scale are unchanged); the references quantize first, then lift.
"""

from __future__ import annotations

import torch

from ..pattern import Pattern, lift, parse_pattern
from ..quant import dequantize, quantize_activations


def quant_ref(x: torch.Tensor, act_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization only (the dense path's activation kernel)."""
    return quantize_activations(x, act_dtype)


def quant_slide_ref(x: torch.Tensor, pat: Pattern | str, act_dtype: str,
                    k_align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (lifted quantized x' [M, K'] zero-padded to a multiple of k_align, s_tok [M])."""
    pat = parse_pattern(pat)
    q, s = quantize_activations(x, act_dtype)
    # lift in float32 (exact for int8/fp8 values), then back to the storage dtype
    ql = lift(q.float(), pat)
    pad = (-ql.shape[-1]) % k_align
    if pad:
        ql = torch.nn.functional.pad(ql, (0, pad))
    return ql.to(q.dtype), s


def dequant_ref(acc: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out = acc * s_tok[m] * s_ch[n] + bias[n], computed in float32."""
    out = acc.float() * s_tok.float().unsqueeze(-1)
    if s_ch is not None:
        out = out * s_ch.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None,
               bias: torch.Tensor | None, act_dtype: str | None,
               compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The SlideSparse linear through its exact dense equivalent.

    w_q is the unslid [N, K] weight in its storage dtype (quantized codes, or bf16/fp16 values);
    by the slide identity x' @ W'^T == x @ W^T this equals the lifted product. The dot products
    are accumulated in `compute_dtype` (float64: exact for int8 codes, and the high-precision
    reference for fp8); the result is in x.dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if act_dtype is None:
        acc = x2.to(compute_dtype) @ w_q.to(compute_dtype).T
        out = acc if bias is None else acc + bias.to(compute_dtype)
        return out.to(x.dtype).reshape(*shape[:-1], -1)
    q, s_tok = quantize_activations(x2, act_dtype)
    acc = q.to(compute_dtype) @ w_q.to(compute_dtype).T
    out = acc * s_tok.to(compute_dtype).unsqueeze(-1)
    if w_scale is not None:
        out = out * w_scale.to(compute_dtype)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], -1)


def masked_dense_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """float64 x @ dequant(W)^T + bias, with no activation quantization: the 'true' layer the
    quantized paths approximate (for error-band checks)."""
    w = dequantize(w_q, w_scale).double()
    out = x.double().reshape(-1, x.shape[-1]) @ w.T
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], -1)
