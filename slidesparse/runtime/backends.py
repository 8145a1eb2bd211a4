"""Choosing a compute backend for a layer.

    reference   pure torch, CPU and GPU: the math of kernels/reference.py (runtime/reference_backend.py)
    cusparselt  CUDA: Triton quant+slide, cuSPARSELt 2:4 GEMM, dequant; dense buckets on vLLM's
                CUTLASS GEMM (runtime/cusparselt_backend.py)

Selection: SLIDESPARSE_BACKEND env var > the `backend` argument (from the checkpoint's
quantization_config) > by device (CUDA -> cusparselt, else reference).
"""

from __future__ import annotations

import os

import torch

from .backend import Backend, BackendError, SlidWeight
from .cusparselt_backend import CusparseltBackend
from .reference_backend import ReferenceBackend

ENV_BACKEND = "SLIDESPARSE_BACKEND"
BACKENDS: dict[str, type[Backend]] = {"reference": ReferenceBackend, "cusparselt": CusparseltBackend}

__all__ = ["Backend", "BackendError", "SlidWeight", "BACKENDS", "ENV_BACKEND", "available", "check_supported",
           "backend_name", "select_backend"]


def available() -> list[str]:
    return sorted(BACKENDS)


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


def backend_name(device: torch.device, requested: str | None = None, weight_dtype: str | None = None) -> str:
    """The backend for a layer on `device`: SLIDESPARSE_BACKEND > `requested` (from the checkpoint's
    quantization_config "backend") > by device. `weight_dtype` lets unsupported combinations fail
    here, with the reason, instead of inside a kernel."""
    name = os.environ.get(ENV_BACKEND) or requested
    if not name or name == "auto":
        name = "cusparselt" if device.type == "cuda" else "reference"
    if name not in BACKENDS:
        raise BackendError(f"unknown SlideSparse backend {name!r}; available: {', '.join(available())}")
    check_supported(name, device, weight_dtype)
    return name


def select_backend(device: torch.device, requested: str | None = None, weight_dtype: str | None = None,
                   tuning=None) -> Backend:
    """A backend instance for one model's layers on `device`; `tuning` (a core.tuning.TuningTable
    or None) is that model's tuning table (the reference backend runs one path at every M)."""
    return BACKENDS[backend_name(device, requested, weight_dtype)](tuning=tuning)
