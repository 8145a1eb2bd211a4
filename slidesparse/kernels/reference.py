"""Pure-torch references for the SlideSparse linear: the definitions the GPU kernels must match,
and the `reference` backend's custom op.

    quant_slide_ref:  x [M, K] (bf16/fp16/fp32) -> lifted, per-token quantized x' [M, K'pad], s_tok [M]
    dequant_ref:      acc [M, N] (fp32/int32)    -> acc * s_tok[m] * s_ch[n] + bias[n], in out dtype
    linear_ref:       the whole layer through the dense equivalent of the lifted product
    slidesparse::reference_linear   the layer as one custom op (dense-equivalent or literally lifted)

Lifting commutes with per-token quantization (it only copies values of a row, so the row's amax
and scale are unchanged); the references quantize first, then lift.
"""

from __future__ import annotations

import torch

from ..core.pattern import Pattern, lift, parse_pattern
from ..core.quant import dequantize, quantize_rows
from .library import op


def quant_slide_ref(x: torch.Tensor, pat: Pattern | str, act_dtype: str,
                    k_align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (lifted quantized x' [M, K'] zero-padded to a multiple of k_align, s_tok [M])."""
    pat = parse_pattern(pat)
    q, s = quantize_rows(x, act_dtype)
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
    q, s_tok = quantize_rows(x2, act_dtype)
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


# compute dtypes the reference op accepts by name (custom-op schemas take str, not torch.dtype)
_COMPUTE = {"float64": torch.float64, "float32": torch.float32}


@op("slidesparse::reference_linear")
def reference_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                     bias: torch.Tensor | None, act_dtype: str, lift_l: int, compute: str) -> torch.Tensor:
    """One SlideSparse linear layer in pure torch.

    lift_l == 0: `weight` is the unslid [N, K] weight and the product is the exact dense
    equivalent (kernels.reference.linear_ref). lift_l == L (or -1 for 2_inf): `weight` is the slid
    [N, K'] weight and the activations are quantized, lifted and multiplied literally, as the GPU
    path does. act_dtype "" means unquantized activations.
    """
    act = act_dtype or None
    cdt = _COMPUTE[compute]
    if lift_l == 0:
        return linear_ref(x, weight, scale, bias, act, compute_dtype=cdt)
    pat = parse_pattern("2_inf" if lift_l < 0 else f"2_{lift_l}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if act is None:
        xl, s_tok = lift(x2, pat), None
    else:
        xl, s_tok = quant_slide_ref(x2, pat, act)
    out = xl.to(cdt) @ weight.to(cdt).T
    if s_tok is not None:
        out = out * s_tok.to(cdt).unsqueeze(-1)
    if scale is not None:
        out = out * scale.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


@reference_linear.register_fake
def _(x, weight, scale, bias, act_dtype, lift_l, compute):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
