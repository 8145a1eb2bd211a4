"""cuSPARSELt matmul plans built once and reused, called through ctypes.

torch's `_cslt_sparse_mm` initialises three matrix descriptors, a matmul descriptor, an algorithm
selection and a plan on the host at every call (about 1 ms per call on the H100 host,
results/H100/diag_linear_host_overhead.json), which makes vLLM's eager prefill host-bound. This
module keeps one plan per problem (N, K', M, dtypes, algorithm, split-k) in a cache and issues
only `cusparseLtMatmul` per call.

It talks to the same libcusparseLt that torch loaded, with the descriptors torch uses, so it
consumes `torch._cslt_compress` output unchanged and must produce bit-identical results to
`torch._cslt_sparse_mm(w_c, x.t(), out_dtype=..., transpose_result=True, alg_id=...)`
(tests/gpu/test_cslt_plan.py checks exactly that):

    A  structured, [N, K'] row-major, ld K'            (the compressed 2:4 weight)
    B  dense, [M, K'] row-major, ld K', op TRANSPOSE   (x' as the quant+slide kernel writes it)
    D  dense, [N, M] column-major, ld N                (the bytes of out [M, N] row-major)

Opaque cuSPARSELt structs are 512-byte buffers aligned to 16 (cusparseLt.h, 0.8). Plans are
never destroyed: a process has a handful of shapes and, with M padded to 16, a bounded set of M.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import torch

from .library import raw_stream

__all__ = ["available", "sparse_mm", "PlanError", "loaded_version", "loaded_version_name"]

_CUDA_R_16F, _CUDA_R_16BF, _CUDA_R_32F, _CUDA_R_8I, _CUDA_R_32I, _CUDA_R_8F_E4M3 = 2, 14, 0, 3, 10, 28
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_COMPUTE_32I, _COMPUTE_32F = 0, 2
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
_ATTR_CONFIG_ID, _ATTR_SPLIT_K = 0, 3
_ALIGN = 16

_DTYPE = {torch.int8: _CUDA_R_8I, torch.float8_e4m3fn: _CUDA_R_8F_E4M3, torch.bfloat16: _CUDA_R_16BF,
          torch.float16: _CUDA_R_16F, torch.float32: _CUDA_R_32F, torch.int32: _CUDA_R_32I}


class PlanError(RuntimeError):
    pass


class _Opaque:
    """A 512-byte, 16-aligned buffer for one cuSPARSELt struct."""

    __slots__ = ("_buf", "ptr")

    def __init__(self):
        self._buf = ctypes.create_string_buffer(512 + 16)
        self.ptr = ctypes.c_void_p((ctypes.addressof(self._buf) + 15) & ~15)


def _find_library() -> ctypes.CDLL:
    try:  # torch loads it by this soname; dlopen returns the same copy
        return ctypes.CDLL("libcusparseLt.so.0")
    except OSError:
        pass
    for base in sys.path:
        for path in glob.glob(os.path.join(base, "nvidia", "cusparselt", "lib", "libcusparseLt.so*")):
            return ctypes.CDLL(path)
    raise PlanError("libcusparseLt.so.0 not found (torch's CUDA build ships it as nvidia-cusparselt)")


class _Lib:
    def __init__(self):
        lib = _find_library()
        vp, i64, u32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
        sig = {
            "cusparseLtInit": [vp],
            "cusparseLtStructuredDescriptorInit": [vp, vp, i64, i64, i64, u32, i32, i32, i32],
            "cusparseLtDenseDescriptorInit": [vp, vp, i64, i64, i64, u32, i32, i32],
            "cusparseLtMatmulDescriptorInit": [vp, vp, i32, i32, vp, vp, vp, vp, i32],
            "cusparseLtMatmulAlgSelectionInit": [vp, vp, vp, i32],
            "cusparseLtMatmulAlgSetAttribute": [vp, vp, i32, vp, ctypes.c_size_t],
            "cusparseLtMatmulPlanInit": [vp, vp, vp, vp],
            "cusparseLtMatmulGetWorkspace": [vp, vp, ctypes.POINTER(ctypes.c_size_t)],
            "cusparseLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(vp), ctypes.c_int32],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
            setattr(self, name, fn)
        lib.cusparseLtGetErrorString.argtypes, lib.cusparseLtGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._err = lib.cusparseLtGetErrorString
        self.handle = _Opaque()
        self.check(self.cusparseLtInit(self.handle.ptr), "cusparseLtInit")
        version = ctypes.c_int(0)
        lib.cusparseLtGetVersion.argtypes, lib.cusparseLtGetVersion.restype = [vp, ctypes.POINTER(ctypes.c_int)], ctypes.c_int
        # informational only (reports): a failure here must not take the plan cache down
        status = lib.cusparseLtGetVersion(self.handle.ptr, ctypes.byref(version))
        self.version = version.value if status == 0 else None
        self.version_parts = _version_parts(lib)

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self._err(status)
            raise PlanError(f"{what} failed: {msg.decode() if msg else status}")


class _Plan:
    __slots__ = ("a", "b", "d", "mm", "alg", "plan", "workspace")

    def __init__(self, lib: _Lib, n: int, k: int, m: int, in_type: int, out_type: int, compute: int,
                 alg_id: int, split_k: int):
        h = lib.handle.ptr
        self.a, self.b, self.d, self.mm, self.alg, self.plan = (_Opaque() for _ in range(6))
        lib.check(lib.cusparseLtStructuredDescriptorInit(h, self.a.ptr, n, k, k, _ALIGN, in_type, _ORDER_ROW,
                                                         _SPARSITY_50), "structured descriptor")
        lib.check(lib.cusparseLtDenseDescriptorInit(h, self.b.ptr, m, k, k, _ALIGN, in_type, _ORDER_ROW),
                  "dense descriptor")
        lib.check(lib.cusparseLtDenseDescriptorInit(h, self.d.ptr, n, m, n, _ALIGN, out_type, _ORDER_COL),
                  "output descriptor")
        lib.check(lib.cusparseLtMatmulDescriptorInit(h, self.mm.ptr, _OP_N, _OP_T, self.a.ptr, self.b.ptr,
                                                     self.d.ptr, self.d.ptr, compute), "matmul descriptor")
        lib.check(lib.cusparseLtMatmulAlgSelectionInit(h, self.alg.ptr, self.mm.ptr, _ALG_DEFAULT), "alg selection")
        v = ctypes.c_int(alg_id)
        lib.check(lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, _ATTR_CONFIG_ID, ctypes.byref(v),
                                                      ctypes.sizeof(v)), f"alg id {alg_id}")
        if split_k != 1:
            s = ctypes.c_int(split_k)
            lib.check(lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, _ATTR_SPLIT_K, ctypes.byref(s),
                                                          ctypes.sizeof(s)), f"split_k {split_k}")
        lib.check(lib.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.mm.ptr, self.alg.ptr), "plan")
        ws = ctypes.c_size_t(0)
        lib.check(lib.cusparseLtMatmulGetWorkspace(h, self.plan.ptr, ctypes.byref(ws)), "workspace size")
        self.workspace = int(ws.value)


_LIB: _Lib | None = None
_PLANS: dict[tuple, _Plan] = {}
_LOCK = threading.Lock()
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                _LIB = _Lib()
    return _LIB


def available() -> bool:
    """True if libcusparseLt loads and initialises here (needs a CUDA GPU)."""
    try:
        _lib()
    except (PlanError, OSError, AttributeError):
        return False
    return True


def loaded_version() -> int | None:
    """The version of the libcusparseLt this process runs (e.g. 800), which is not always the one
    torch was built against (torch.backends.cusparselt.version()): LD_PRELOAD can put another in.
    The packed number is ambiguous (0.10.0 and 1.0.0 both read 1000): name it with loaded_version_name."""
    return _lib().version if available() else None


def loaded_version_name() -> str | None:
    """"0.10.0": the loaded library's version from its major, minor and patch properties."""
    if not available():
        return None
    lib = _lib()
    return version_name(lib.version_parts, lib.version)


def version_name(parts: tuple[int, int, int] | None, packed: int | None) -> str | None:
    """"major.minor.patch" from cusparseLtGetProperty's parts; without them from the packed
    cusparseLtGetVersion number (major*1000 + minor*100 + patch), marked "?" where that reading is
    ambiguous (a minor of 10 or more spills into the thousands: 0.10.0 reads as 1.0.0)."""
    if parts is not None:
        return ".".join(map(str, parts))
    if packed is None:
        return None
    name = f"{packed // 1000}.{packed % 1000 // 100}.{packed % 100}"
    return name if packed < 1000 else name + "?"


def _version_parts(lib: ctypes.CDLL) -> tuple[int, int, int] | None:
    fn = getattr(lib, "cusparseLtGetProperty", None)
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    parts = []
    for prop in (0, 1, 2):   # libraryPropertyType: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        v = ctypes.c_int(-1)
        if fn(prop, ctypes.byref(v)) != 0:
            return None
        parts.append(v.value)
    return tuple(parts)


def sparse_mm(w_compressed: torch.Tensor, n: int, xq: torch.Tensor, out_dtype: torch.dtype | None,
              alg_id: int = 0, split_k: int = 1) -> torch.Tensor:
    """acc [M, N] (row-major) = xq [M, K'] @ W'^T with W' [N, K'] compressed by torch._cslt_compress.

    n is W's padded row count (the compressed tensor does not carry it). out_dtype None: the
    input dtype (bf16/fp16 weights).
    """
    m, k = xq.shape
    if not xq.is_contiguous():
        raise PlanError("x' must be row-major contiguous")
    in_dt = xq.dtype
    out_dt = out_dtype or in_dt
    if in_dt not in _DTYPE or out_dt not in _DTYPE:
        raise PlanError(f"unsupported dtypes {in_dt} -> {out_dt}")
    compute = _COMPUTE_32I if in_dt == torch.int8 else _COMPUTE_32F
    key = (n, k, m, in_dt, out_dt, alg_id, split_k)
    plan = _PLANS.get(key)
    lib = _lib()
    if plan is None:
        with _LOCK:
            plan = _PLANS.get(key) or _Plan(lib, n, k, m, _DTYPE[in_dt], _DTYPE[out_dt], compute, alg_id, split_k)
            _PLANS[key] = plan
    out = torch.empty(m, n, dtype=out_dt, device=xq.device)
    ws = torch.empty(max(plan.workspace, 1), dtype=torch.uint8, device=xq.device)
    stream = ctypes.c_void_p(raw_stream(xq.get_device()))
    lib.check(lib.cusparseLtMatmul(lib.handle.ptr, plan.plan.ptr, ctypes.byref(_ONE), w_compressed.data_ptr(),
                                   xq.data_ptr(), ctypes.byref(_ZERO), out.data_ptr(), out.data_ptr(),
                                   ws.data_ptr(), ctypes.byref(stream), 1), "cusparseLtMatmul")
    return out
