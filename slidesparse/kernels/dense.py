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

from ..core.quant import quantize_rows

__all__ = ["dense_kernel", "dense_scaled_mm", "KERNELS", "bind_stock_ops", "stock_w8a8_linear"]

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
        return _cutlass_scaled_mm(_vllm_ops(), q, w, s_tok, s_ch, bias, out_dtype)
    if kernel == "triton_int8":
        from .int8_gemm import int8_linear
        return int8_linear(q, w, s_tok, s_ch, bias, out_dtype)
    if kernel == "torch_scaled_mm":
        out = torch._scaled_mm(q, w.t(), scale_a=s_tok.view(-1, 1), scale_b=s_ch.view(1, -1), out_dtype=out_dtype)
        return out if bias is None else out + bias.to(out_dtype)
    raise ValueError(f"unknown dense kernel {kernel!r}: choose one of {', '.join(KERNELS)}")


# vllm._custom_ops once bind_stock_ops() has found it; stock_w8a8_linear reads it as a module
# global, as vLLM's own kernel classes read theirs, so torch.compile traces the call into the graph
_STOCK_OPS = None


def bind_stock_ops(device: torch.device | str) -> bool:
    """Whether stock vLLM's W8A8 ops (scaled_int8_quant, cutlass_scaled_mm) run on `device`; where
    they do, they are bound for stock_w8a8_linear."""
    global _STOCK_OPS
    if dense_kernel("int8", device) != "vllm_cutlass":
        return False
    _STOCK_OPS = _vllm_ops()
    return True


def stock_w8a8_linear(x: torch.Tensor, w: torch.Tensor, s_ch: torch.Tensor, bias: torch.Tensor | None,
                      act_dtype: str, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] in bf16/fp16 -> [M, N]: the dynamic per-token W8A8 linear as stock vLLM runs it in a
    compiled model (its CutlassInt8/CutlassFP8 ScaledMM kernel classes): INT8 quantized by vLLM's
    scaled_int8_quant op, FP8 by per-token torch ops (what vLLM's QuantFP8 lowers to under
    torch.compile, fused by Inductor into x's producer), then cutlass_scaled_mm with the scales and
    bias in its epilogue. Plain torch and vLLM ops, no op of ours around them: a layer whose every
    bucket is dense costs the host and the GPU what the dense checkpoint's layer costs (through a
    custom op of ours it cost about 0.1 ms of host time more per layer, which shows wherever a step
    runs outside a CUDA graph and the host is the bottleneck). Call bind_stock_ops() first."""
    ops = _STOCK_OPS
    if act_dtype == "int8":
        q, s_tok, _ = ops.scaled_int8_quant(x.contiguous(), None, None, symmetric=True)
    else:
        q, s_tok = quantize_rows(x, act_dtype)
    return _cutlass_scaled_mm(ops, q, w, s_tok, s_ch, bias, out_dtype)


def _cutlass_scaled_mm(ops, q, w, s_tok, s_ch, bias, out_dtype):
    # vLLM's CUTLASS GEMM takes the weight column-major ([N, K] row-major, transposed) and the
    # scales as [M, 1] and [N, 1]
    return ops.cutlass_scaled_mm(q, w.t(), scale_a=s_tok.view(-1, 1), scale_b=s_ch.view(-1, 1),
                                 out_dtype=out_dtype, bias=None if bias is None else bias.to(out_dtype))
