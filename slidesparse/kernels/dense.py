"""The dense W8A8 GEMM with per-token x per-channel scales and the bias in its epilogue.

    dense_scaled_mm(q [M, K], w [N, K], s_tok [M], s_ch [N], bias [N] | None, out_dtype) -> [M, N]

What stock vLLM runs for a dense W8A8 checkpoint is its CUTLASS kernel (`cutlass_scaled_mm`,
vllm/_custom_ops.py); wherever vLLM is importable on a CUDA machine this module calls exactly that,
so the runtime's dense buckets and the benchmarks' dense baseline cost what users pay. Without
vLLM (tests, the bare GPU host) the stand-ins are torch._scaled_mm for FP8 and the Triton INT8
GEMM (kernels/int8_gemm.py); `dense_kernel()` names the one in use, and reports print it.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["dense_kernel", "dense_scaled_mm", "KERNELS"]

KERNELS = ("vllm_cutlass", "torch_scaled_mm", "triton_int8")


@functools.cache
def _vllm_ops():
    try:
        from vllm import _custom_ops as ops
        if not hasattr(torch.ops._C, "cutlass_scaled_mm"):
            return None
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    return ops


def dense_kernel(act_dtype: str, device: torch.device | str = "cuda") -> str:
    """The kernel dense_scaled_mm runs for this activation dtype on `device`."""
    if torch.device(device).type == "cuda" and _vllm_ops() is not None:
        return "vllm_cutlass"
    return "triton_int8" if act_dtype == "int8" else "torch_scaled_mm"


def dense_scaled_mm(q: torch.Tensor, w: torch.Tensor, s_tok: torch.Tensor, s_ch: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, kernel: str | None = None) -> torch.Tensor:
    """out[m, n] = (sum_k q[m, k] w[n, k]) * s_tok[m] * s_ch[n] + bias[n], one rounding to out_dtype.

    q: int8 / fp8 codes [M, K] row-major; w: the weight [N, K] row-major (its .t() is the
    column-major [K, N] operand both CUTLASS and torch._scaled_mm take); scales float32."""
    act = "int8" if q.dtype == torch.int8 else "fp8_e4m3"
    kernel = kernel or dense_kernel(act, q.device)
    if kernel == "vllm_cutlass":
        ops = _vllm_ops()
        return ops.cutlass_scaled_mm(q, w.t(), scale_a=s_tok.view(-1, 1), scale_b=s_ch.view(-1, 1),
                                     out_dtype=out_dtype, bias=None if bias is None else bias.to(out_dtype))
    if kernel == "triton_int8":
        from .int8_gemm import int8_linear
        return int8_linear(q, w, s_tok, s_ch, bias, out_dtype)
    if kernel == "torch_scaled_mm":
        out = torch._scaled_mm(q, w.t(), scale_a=s_tok.view(-1, 1), scale_b=s_ch.view(1, -1), out_dtype=out_dtype)
        return out if bias is None else out + bias.to(out_dtype)
    raise ValueError(f"unknown dense kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
