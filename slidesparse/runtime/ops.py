"""The runtime's custom ops (torch.library), each with a fake implementation.

vLLM compiles the model with torch.compile(fullgraph=True) and captures CUDA graphs; a linear
layer therefore has to be one opaque op whose output shape the compiler can infer without running
it. Importing this module defines the ops once per process (torch.library refuses a second
definition, and Python imports a module once, so this is idempotent).
"""

from __future__ import annotations

import torch

from ..kernels.reference import linear_ref, quant_slide_ref
from ..pattern import lift, parse_pattern

# compute dtypes the reference op accepts by name (custom-op schemas take str, not torch.dtype)
_COMPUTE = {"float64": torch.float64, "float32": torch.float32}


@torch.library.custom_op("slidesparse::reference_linear", mutates_args=())
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
