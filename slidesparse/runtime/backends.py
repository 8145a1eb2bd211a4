"""Compute backends behind one interface.

The linear method (runtime/config.py) unpacks a layer's checkpoint tensors into a SlidWeight once
after loading and hands it to the chosen backend's prepare(); apply() then runs the whole layer
(activation quant+slide, GEMM, dequant+bias) through exactly one custom op.

    reference   pure torch, CPU and GPU: the math of kernels/reference.py
    cusparselt  CUDA: fused Triton quant+slide, cuSPARSELt 2:4 GEMM, fused dequant (kernels/)

Selection: SLIDESPARSE_BACKEND env var > the `backend` argument (from config) > by device
(CUDA with sm >= 8.0 and cuSPARSELt -> cusparselt, else reference).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import torch

from ..pattern import Pattern

ENV_BACKEND = "SLIDESPARSE_BACKEND"


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
        """x [..., K] -> [..., N] in x.dtype, through one custom op (torch.compile / CUDA-graph safe)."""


class BackendError(RuntimeError):
    pass


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # importing the modules registers them; cusparselt_backend imports Triton and touches CUDA
    # only when a layer is prepared, so this works (and must not fail) on CPU-only machines
    from . import reference_backend  # noqa: F401
    from ..kernels import cusparselt_backend  # noqa: F401


def check_supported(name: str, device: torch.device, weight_dtype: str | None = None) -> None:
    """Raise BackendError for a backend/device/dtype combination that cannot run."""
    if name != "cusparselt":
        return  # the reference backend runs everywhere torch does
    if device.type != "cuda":
        raise BackendError(f"the cusparselt backend needs a CUDA GPU, but the model is on {device.type}; "
                           f"use {ENV_BACKEND}=reference (or leave it unset)")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        raise BackendError(f"the cusparselt backend needs 2:4 sparse tensor cores (sm_80+), this GPU is "
                           f"sm_{cap[0]}{cap[1]}; use {ENV_BACKEND}=reference")
    if weight_dtype == "fp8_e4m3" and cap < (8, 9):
        raise BackendError(f"FP8 SlideSparse checkpoints need sm_89+ (Ada, Hopper), this GPU is sm_{cap[0]}{cap[1]}; "
                           f"convert with --dtype int8, or use {ENV_BACKEND}=reference to emulate")


def select_backend(device: torch.device, requested: str | None = None,
                   weight_dtype: str | None = None) -> Backend:
    """The backend for a layer on `device`: SLIDESPARSE_BACKEND > `requested` (from the checkpoint's
    quantization_config "backend") > by device. `weight_dtype` lets unsupported combinations fail
    here, with the reason, instead of inside a kernel."""
    _load_builtin()
    name = os.environ.get(ENV_BACKEND) or requested
    if not name or name == "auto":
        name = "cusparselt" if (device.type == "cuda" and "cusparselt" in _REGISTRY) else "reference"
    check_supported(name, device, weight_dtype)
    if name not in _REGISTRY:
        raise BackendError(f"unknown SlideSparse backend {name!r}; available here: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
