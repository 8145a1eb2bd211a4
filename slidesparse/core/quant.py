"""Quantization math shared by the converter, the runtime, the kernels' references and the tests.

One definition of each scheme, so that what the converter writes, what the reference backend
computes and what the GPU kernels are checked against cannot drift apart.

Weights: symmetric per-output-channel scales, q = w * (qmax / amax_row), scale = amax_row / qmax.
BitNet b1.58: per-tensor absmean ternary, q = clamp(round(w / mean|w|), -1, 1), exact in int8/fp8.
Activations: per-token dynamic, q = x * (qmax / amax_row), scale = amax_row / qmax, in float32.
All-zero rows use amax = AMAX_FLOOR so nothing divides by zero (their q is 0 either way).
INT8 rounds half to even and clamps to [-127, 127] (symmetric: -128 is never produced).
FP8-E4M3 rounds to nearest even through the dtype cast after clamping to [-448, 448].
"""

from __future__ import annotations

import torch

from .errors import SlideSparseError

FP8_MAX = 448.0
INT8_MAX = 127.0
AMAX_FLOOR = 1e-12
TERNARY_FLOOR = 1e-5

# public dtype names used in configs and on the command line
DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "bfloat16": "bf16",
           "float16": "fp16", "half": "fp16"}
QUANTIZED = ("fp8_e4m3", "int8")


class QuantError(SlideSparseError):
    """An unknown dtype name."""


def dtype_name(name: str) -> str:
    """Canonical dtype name ('fp8' -> 'fp8_e4m3'); QuantError for unknown names."""
    if not isinstance(name, str):
        raise QuantError(f"dtype must be a name such as fp8 or int8, got {name!r}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise QuantError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)} (or fp8)")
    return key


def qmax(name: str) -> float:
    return {"fp8_e4m3": FP8_MAX, "int8": INT8_MAX}[dtype_name(name)]


def _to_q(v: torch.Tensor, name: str) -> torch.Tensor:
    """float32 values already scaled into range -> stored dtype."""
    name = dtype_name(name)
    if name == "int8":
        return v.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return v.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of [..., K] -> (q [..., K], scale float32 [...]): weights per
    output channel and activations per token alike. The one definition: the Triton kernels are
    tested against it, and the traced GPU layer runs it as torch ops for Inductor to fuse."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True).clamp_(min=AMAX_FLOOR)
    q = _to_q(x32 * (qmax(name) / amax), name)
    return q, (amax / qmax(name)).squeeze(-1)


def quantize_weight(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization; bf16/fp16 are a plain cast with no scale."""
    name = dtype_name(name)
    if name in QUANTIZED:
        return quantize_rows(w, name)
    return w.to(DTYPES[name]), None


def quantize_ternary(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean ternary: per-tensor scale mean|w|, codes in {-1, 0, 1}.

    Returns the codes in the storage dtype and the scale broadcast per output channel (float32 [N]),
    so the runtime treats BitNet like any per-channel scheme.
    """
    w32 = w.float()
    s = w32.abs().mean().clamp(min=TERNARY_FLOOR)
    codes = (w32 / s).round().clamp_(-1, 1)
    return codes.to(DTYPES[dtype_name(name)]), torch.full((w.shape[0],), float(s), dtype=torch.float32)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored weight -> float32 values (scale per row, or None for bf16/fp16)."""
    v = q.float()
    return v if scale is None else v * scale.float().unsqueeze(-1)
