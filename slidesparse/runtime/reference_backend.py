"""The `reference` backend: pure torch, any device, the same math as the GPU path.

prepare() keeps the unslid [N, K] weight (the exact dense equivalent of the slid one) and the
scale; apply() is the slidesparse::reference_linear op (kernels/reference.py). SLIDESPARSE_REFERENCE_MODE=lifted keeps
the slid [N, K'] weight instead and runs the literal quantize -> lift -> x' @ W'^T product (slower;
tests check that both forms agree). SLIDESPARSE_REFERENCE_COMPUTE=float32 trades the float64
accumulation for speed.
"""

from __future__ import annotations

import os

import torch

from ..core.pattern import unslide
from ..kernels import reference  # noqa: F401  (defines torch.ops.slidesparse.reference_linear)
from .backend import Backend, BackendError, SlidWeight

ENV_MODE = "SLIDESPARSE_REFERENCE_MODE"
ENV_COMPUTE = "SLIDESPARSE_REFERENCE_COMPUTE"


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.contiguous(), requires_grad=False)


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, mode: str | None = None, compute: str | None = None, tuning=None):
        # tuning is accepted and unused: this backend runs the same math at every M
        self.mode = mode or os.environ.get(ENV_MODE, "dense")
        self.compute = compute or os.environ.get(ENV_COMPUTE, "float64")
        if self.mode not in ("dense", "lifted"):
            raise BackendError(f"{ENV_MODE} must be 'dense' or 'lifted', got {self.mode!r}")
        if self.compute not in ("float64", "float32"):
            raise BackendError(f"{ENV_COMPUTE} must be 'float64' or 'float32', got {self.compute!r}")

    def prepare(self, layer: torch.nn.Module, w: SlidWeight) -> None:
        pat = w.pattern
        if self.mode == "dense":
            weight, lift_l = unslide(w.slid, pat, w.in_features), 0
        else:
            weight, lift_l = w.slid, (-1 if pat.L is None else pat.L)
        layer.ss_weight = _param(weight)
        layer.ss_scale = None if w.scale is None else _param(w.scale.float())
        # plain attributes: apply() reads them as Python constants, so the op's schema stays static
        layer.ss_act_dtype = w.act_dtype or ""
        layer.ss_lift_l = lift_l
        layer.ss_compute = self.compute

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.slidesparse.reference_linear(
            x, layer.ss_weight, layer.ss_scale, bias, layer.ss_act_dtype, layer.ss_lift_l, layer.ss_compute)
