"""The interface every compute backend implements (runtime/backends.py selects one).

The linear method (runtime/config.py) unpacks a layer's checkpoint tensors into a SlidWeight once
after loading and hands it to the backend's prepare(); apply() then runs the whole layer
(activation quant+slide, GEMM, dequant+bias) through custom ops (torch.compile / CUDA-graph safe).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..core.pattern import Pattern


@dataclass
class SlidWeight:
    """One layer's weights, unpacked, on the layer's device (this TP rank's part)."""

    pattern: Pattern
    in_features: int                  # K of this rank's part, before sliding
    out_features: int                 # N of this rank's part
    weight_dtype: str                 # fp8_e4m3 | int8 | bf16 | fp16
    act_dtype: str | None             # fp8_e4m3 | int8 | None
    slid: torch.Tensor                # [N, K'] 2:4 weight in the storage dtype (K' = pattern.lifted_k(K))
    scale: torch.Tensor | None        # [N] float32 per-channel scale, None for bf16/fp16


class Backend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def prepare(self, layer: torch.nn.Module, w: SlidWeight) -> None:
        """Once after loading: put on `layer` (as parameters/buffers) what apply() needs, and
        release anything else. No work may be left for the first apply()."""

    @abc.abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] -> [..., N] in x.dtype, through custom ops (torch.compile / CUDA-graph safe)."""


class BackendError(RuntimeError):
    pass
