"""Helpers shared by the CPU test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from slidesparse.core.format import SlideSparseConfig
from slidesparse.core.pattern import pack, parse_pattern, slide
from slidesparse.core.prune import prune_magnitude
from slidesparse.core.quant import quantize_weight
from slidesparse.kernels import reference  # noqa: F401  (defines torch.ops.slidesparse.reference_linear)


def pruned_q(n, k, pat, dtype, gen):
    """A random [N, K] weight pruned to the pattern and quantized: (w_q, scale)."""
    w = torch.randn(n, k, generator=gen)
    if parse_pattern(pat).L is not None:
        w = prune_magnitude(w, pat)
    return quantize_weight(w, dtype)


def ref_op(x, w, scale, bias, act, lift_l):
    return torch.ops.slidesparse.reference_linear(x, w, scale, bias, act or "", lift_l, "float64")


def w8a8_cfg(pat, dtype="int8"):
    return SlideSparseConfig(sparsity=pat, weight_dtype=dtype, weight_scheme="per_channel_symmetric",
                             activation_dtype=dtype, activation_scheme="per_token_dynamic")


def packed(q, scale, pat):
    values, meta = pack(slide(q, pat), pat)
    return {"weight_packed": values, "weight_meta": meta, "weight_scale": scale,
            "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}


def read_all(d):
    """Every tensor of a safetensors checkpoint directory, through safetensors itself."""
    t = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t[k] = h.get_tensor(k)
    return t


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
