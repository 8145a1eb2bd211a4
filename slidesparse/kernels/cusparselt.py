"""cuSPARSELt 2:4 GEMM through torch's bindings (torch._cslt_compress / _cslt_sparse_mm / _search).

Orientation: cuSPARSELt's sparse operand is the left one, so the layer computes
    out^T [N, M] = W' [N, K'] (2:4, compressed once at load) @ x'^T [K', M]
and asks for transpose_result=True, which makes cuSPARSELt store D column-major: the bytes are
out [M, N] row-major, what the dequant kernel and the next layer want, with no copy.

Shape rules (cuSPARSELt 0.8, 8-bit inputs): the sparse operand needs rows and columns in
multiples of 32, the dense one multiples of 16. The runtime pads N to 32 (zero rows) and K' to
K_ALIGN (zero columns) once at load; quant+slide writes x' with M padded to M_ALIGN.

What torch's binding does per call (read from ATen's cuSPARSELtOps.cpp): it initialises the
descriptors and the plan on the host (0.6-1.2 ms per call on the H100 host) and takes the workspace
from the caching allocator; it never synchronises and captures into CUDA graphs. sparse_mm therefore
goes through kernels/cslt_plan.py by default, which builds each plan once and is bit-identical to
torch's binding (tests/gpu/test_cslt_plan.py); SLIDESPARSE_CSLT_IMPL=torch selects torch's binding.
Compression and the algorithm search stay with torch's binding.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["K_ALIGN", "N_ALIGN", "M_ALIGN", "compress", "sparse_mm", "search_alg", "CusparseltError",
           "acc_dtype_for"]

K_ALIGN = 64
N_ALIGN = 32
M_ALIGN = 16
DEFAULT_IMPL = "plan"


class CusparseltError(RuntimeError):
    pass


def acc_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """GEMM output dtype ahead of the dequant kernel (chosen by measurement, docs/performance.md).

    bf16 halves the bytes the GEMM writes and the dequant reads against fp32/int32; its 8-bit
    mantissa rounds the accumulator once (relative 2**-9), far below the FP8/INT8 activation
    quantization error. bf16, not fp16: an FP8 accumulator reaches 448*448*K > 65504.
    """
    if weight_dtype in (torch.float8_e4m3fn, torch.int8):
        return torch.bfloat16
    return weight_dtype


def padded_n(n: int) -> int:
    return -(-n // N_ALIGN) * N_ALIGN


def pad_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K'] -> [N pad 32, K' pad 64] with zeros (still 2:4: zeros are free)."""
    n, kp = w.shape
    pn, pk = (-n) % N_ALIGN, (-kp) % K_ALIGN
    if pn or pk:
        w = torch.nn.functional.pad(w.view(torch.int8) if w.element_size() == 1 else w, (0, pk, 0, pn))
    return w


def compress(w_slid: torch.Tensor) -> torch.Tensor:
    """The 2:4 weight [N, K'] in its storage dtype -> cuSPARSELt's compressed form (once, at load)."""
    if not w_slid.is_cuda:
        raise CusparseltError("cuSPARSELt compression needs the weight on a CUDA device")
    dt = w_slid.dtype
    w = pad_weight(w_slid.view(torch.int8) if dt == torch.float8_e4m3fn else w_slid)
    if dt == torch.float8_e4m3fn:
        w = w.view(torch.float8_e4m3fn)
    return torch._cslt_compress(w.contiguous())


IMPL_ENV = "SLIDESPARSE_CSLT_IMPL"


def _impl() -> str:
    """'plan' (kernels/cslt_plan.py: plans cached, one cusparseLtMatmul per call) or 'torch'
    (torch._cslt_sparse_mm: descriptors and plan rebuilt on the host at every call)."""
    impl = os.environ.get(IMPL_ENV, DEFAULT_IMPL)
    if impl not in ("plan", "torch"):
        raise CusparseltError(f"{IMPL_ENV} must be 'plan' or 'torch', got {impl!r}")
    return impl


def sparse_mm(w_compressed: torch.Tensor, xq: torch.Tensor, out_dtype: torch.dtype | None,
              alg_id: int = 0, split_k: int = 1, bias: torch.Tensor | None = None,
              n: int | None = None) -> torch.Tensor:
    """xq [M_pad, K'_pad] (row-major) -> acc [M_pad, N_pad] row-major (transpose_result).

    n (the padded row count of W) selects the plan-caching path when SLIDESPARSE_CSLT_IMPL allows.
    """
    if n is not None and bias is None and _impl() == "plan":
        from . import cslt_plan
        return cslt_plan.sparse_mm(w_compressed, n, xq, out_dtype, alg_id=alg_id, split_k=split_k)
    kwargs = {}
    if split_k != 1:
        kwargs["split_k"] = split_k
    return torch._cslt_sparse_mm(w_compressed, xq.t(), bias=bias, out_dtype=out_dtype,
                                 transpose_result=True, alg_id=alg_id, **kwargs)


def search_alg(w_compressed: torch.Tensor, xq: torch.Tensor, out_dtype: torch.dtype | None) -> int:
    """cuSPARSELt's own search (it times every algorithm on these operands) -> the fastest alg id."""
    with warnings.catch_warnings():
        # torch 2.11 marks the op deprecated in favour of a private one; it still works
        warnings.simplefilter("ignore", UserWarning)
        return int(torch._cslt_sparse_mm_search(w_compressed, xq.t(), out_dtype=out_dtype, transpose_result=True))


def num_algs_probe(w_compressed: torch.Tensor, xq: torch.Tensor, out_dtype: torch.dtype | None,
                   limit: int = 16) -> list[int]:
    """Alg ids that run for this problem (cuSPARSELt rejects out-of-range ids with an error)."""
    ok = []
    for a in range(limit):
        try:
            sparse_mm(w_compressed, xq, out_dtype, alg_id=a)
        except RuntimeError:
            break
        ok.append(a)
    return ok
