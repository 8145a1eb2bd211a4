"""SlideSparse's own CUTLASS SM90 structured-sparse GEMM (csrc/), called through ctypes.

    out [M, N] = (x' [M, K'] @ W'^T) * s_tok[m] * s_ch[n] + bias[n]

with W' [N, K'] the slid 2:4 weight (the sparse operand), x' the lifted 8-bit activations, FP8
E4M3 or INT8 in, BF16 or FP16 out. The scales and the bias are applied in the GEMM's epilogue
(a CUTLASS epilogue visitor tree, fp32 math, one rounding to the output dtype), so no dequant
pass follows it. Orientation, as cuSPARSELt's: the GEMM computes D [N, M] = W' x'^T with W' as
CUTLASS's sparse A operand and stores D column-major, which is byte for byte out [M, N] row-major.

API (pure functions; nothing here imports slidesparse.runtime):

    available() -> bool                     library loadable and an sm_90 GPU present; never raises
    why_unavailable() -> str | None         one line for the user, None when available
    configs(dtype, out_dtype=torch.bfloat16) -> list[str]
        the compiled configurations for that input dtype with the run-time options worth tuning:
        NAME, NAME:sw2|sw4|sw8 (tile-order swizzle), and for a stream-K configuration also
        NAME:streamk, NAME:split2|split4|split8. Any 'NAME[:opt]...' is accepted, opt one of
        streamk, split<N>, sw1|sw2|sw4|sw8, rasterm, rastern (tile raster along channels/tokens).
    config_info(name) -> dict               tile, cluster, schedule, stages, shared memory
    default_config(dtype, m, out_dtype=torch.bfloat16) -> str   used when config is None
    K_ALIGN = 64                            K' of x' and of the compressed weight is a multiple
    padded_k(k) -> int                      round K' up to K_ALIGN (the width x' must have)
    compress(w_slid, k=None) -> CompressedWeight      [N, K'] int8 | float8_e4m3fn, CUDA
    compress_packed(values, meta, k=None) -> CompressedWeight   from the project's packed form
    scaled_sparse_mm(x_lifted, w, s_tok, s_ch, bias=None, out_dtype=torch.bfloat16,
                     config=None) -> Tensor [M, N]
    decompress(w) -> Tensor [N, k]          the dense 2:4 weight back (tests, debugging)
    lift_available() -> bool                the library has the native lift (csrc/ss_lift.cu)
    lift_into(q, out, m, p, w, inf)         the lift of 1-byte codes into a preallocated x'
                                            (kernels/quant_slide.lift_codes calls it on CUDA)

Shapes and padding. K' is padded with zero columns to k = padded_k(K') (64, the same K_ALIGN as the
cuSPARSELt path, so one x' buffer serves both kernels); x' must have exactly w.k columns (its
padding zero). N is not padded (the output has exactly N columns) but must be a multiple of 8
(16-byte rows for the TMA store). M is anything >= 0. Offsets are 64-bit throughout; each extent
must fit in int32.

Per call: no host synchronisation, no allocation outside torch's caching allocator (the output
and, for split-K/stream-K, a workspace that the kernel zeroes on the stream), the current torch
stream: it captures into and replays from CUDA graphs. The C ABI is csrc/ss_cutlass.h.

Why ctypes rather than a torch extension op: the library is built on a machine without a GPU
(and without torch's CUDA headers: this project's CPU torch is 2.13, the GPU host's 2.11), and a C
ABI does not depend on torch's C++ ABI, so one .so serves every torch version. Registering it as
a torch.library custom op for tracing is the runtime's job (it already does so for cuSPARSELt).

The compressed layout (CUTLASS 4.2, Sm90GemmSparseConfig, 8-bit A, K-major, metadata atom (64, 128)):
  values: [N, k/2], each 2:4 window's two kept values in ascending position order, row-major:
          exactly the project's packed values (slidesparse pattern.pack), padded to k/2.
  meta:   one nibble (i0 | i1 << 2) per window, two windows per byte, low nibble first: the
          project's packed metadata; rows padded to a multiple of 64 and bytes to k/128*16, then
          blocked as [k/128][N/64*64][16] (for each 128-column slab, every row's 16 bytes).
decompress() is the inverse; the GPU tests check it against CUTLASS's own compressor kernel.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .library import raw_stream

__all__ = [
    "available", "why_unavailable", "configs", "config_info", "default_config", "K_ALIGN", "padded_k",
    "CompressedWeight", "compress", "compress_packed", "decompress", "scaled_sparse_mm", "CutlassSparseError",
    "library_path", "build_info", "meta_to_cutlass", "meta_from_cutlass", "plain_configs",
    "unscaled_mm_for_measurement", "lift_available", "lift_into",
]

K_ALIGN = 64
N_ALIGN = 8
LIB_ENV = "SLIDESPARSE_CUTLASS_LIB"
LIB_NAME = "libslidesparse_cutlass.so"
_ABI_VERSION = 2
_META_ATOM_ROWS, _META_ATOM_COLS = 64, 128  # logical (64, 128) = 64 rows x 16 bytes

_IN_CODE = {torch.float8_e4m3fn: 0, torch.int8: 1}
_OUT_CODE = {torch.bfloat16: 2, torch.float16: 3}
_CODE_NAME = {0: "fp8", 1: "int8", 2: "bf16", 3: "fp16"}
_SCHED_NAME = {0: "pingpong", 1: "coop", 2: "streamk"}
_MODE = {"": 0, "splitk": 1, "streamk": 2}
_SPLITS = (2, 4, 8)
_SWIZZLES = (2, 4, 8)
_RASTER = {"rasterm": 1, "rastern": 2}
_STATUS = {
    1: "no such configuration", 2: "split-K/stream-K needs a streamk configuration",
    3: "CUTLASS cannot implement this problem (alignment or layout)", 4: "workspace too small",
    5: "kernel parameter set-up failed", 6: "kernel launch failed", 7: "no usable sm_90 device",
    8: "bad argument",
}


class CutlassSparseError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- the library

class _Args(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("w_values", ctypes.c_void_p), ("w_meta", ctypes.c_void_p),
        ("s_tok", ctypes.c_void_p), ("s_ch", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
        ("mode", ctypes.c_int32), ("splits", ctypes.c_int32), ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t), ("stream", ctypes.c_void_p), ("device", ctypes.c_int32),
        ("swizzle", ctypes.c_int32), ("raster", ctypes.c_int32),
    ]


class _LiftArgs(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("m", ctypes.c_int64), ("mp", ctypes.c_int64),
        ("k", ctypes.c_int64), ("kq", ctypes.c_int64), ("src_stride", ctypes.c_int64), ("dst_stride", ctypes.c_int64),
        ("p", ctypes.c_int32), ("w", ctypes.c_int32), ("inf", ctypes.c_int32), ("pad_", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
    ]


class _Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int32) for f in (
        "in_dtype", "out_dtype", "tile_m", "tile_n", "tile_k", "cluster_m", "cluster_n", "schedule",
        "stages", "smem_bytes", "threads", "plain_epilogue")] + [("run", ctypes.c_void_p),
                                                                 ("workspace_size", ctypes.c_void_p)]


def library_path() -> Path | None:
    """Where the library is looked for: $SLIDESPARSE_CUTLASS_LIB, the checkout's build/csrc/, or
    next to this module (an installed package with the .so copied in)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "build" / "csrc" / LIB_NAME, here.parent / LIB_NAME):
        if cand.is_file():
            return cand
    return None


def _preload_cudart() -> None:
    """libslidesparse_cutlass.so needs libcudart.so.13; torch's CUDA build has normally loaded it
    (then the soname resolves to that copy), otherwise take the nvidia-cuda-runtime wheel's."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for base in sys.path:
        for path in glob.glob(os.path.join(base, "nvidia", "cu13", "lib", "libcudart.so.13")) + glob.glob(
                os.path.join(base, "nvidia", "cuda_runtime", "lib", "libcudart.so.13")):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


class _Lib:
    def __init__(self, path: Path):
        _preload_cudart()
        lib = ctypes.CDLL(str(path))
        i32, i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
        sig = {
            "ss_abi_version": ([], i32), "ss_num_configs": ([], i32), "ss_config_name": ([i32], ctypes.c_char_p),
            "ss_config_info_get": ([i32, ctypes.POINTER(_Info)], i32),
            "ss_values_bytes": ([i64, i64], i64), "ss_meta_bytes": ([i64, i64], i64),
            "ss_workspace_size": ([i32, ctypes.POINTER(_Args), ctypes.POINTER(ctypes.c_size_t)], i32),
            "ss_run": ([i32, ctypes.POINTER(_Args)], i32),
            "ss_compress_reference": ([i32, vp, vp, vp, i64, i64, vp], i32),
            "ss_last_cuda_error": ([], ctypes.c_char_p), "ss_build_info": ([], ctypes.c_char_p),
        }
        for name, (args, res) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)
        # the lift (csrc/ss_lift.cu) came after ABI 2: a library built before it has no such symbol
        self.ss_lift_codes = getattr(lib, "ss_lift_codes", None)
        if self.ss_lift_codes is not None:
            self.ss_lift_codes.argtypes, self.ss_lift_codes.restype = [ctypes.POINTER(_LiftArgs)], i32
        if self.ss_abi_version() != _ABI_VERSION:
            raise CutlassSparseError(f"{path} has C ABI {self.ss_abi_version()}, this module expects "
                                     f"{_ABI_VERSION}: rebuild with bash tools/build_csrc.sh")
        self.path = path
        self.build_info = self.ss_build_info().decode()
        self.index: dict[str, int] = {}
        self.info: dict[str, dict] = {}
        for i in range(self.ss_num_configs()):
            name = self.ss_config_name(i).decode()
            inf = _Info()
            self.ss_config_info_get(i, ctypes.byref(inf))
            self.index[name] = i
            self.info[name] = {f: getattr(inf, f) for f, _ in _Info._fields_ if f not in ("run", "workspace_size")}

    def error(self, status: int, what: str) -> CutlassSparseError:
        cuda = self.ss_last_cuda_error().decode()
        return CutlassSparseError(f"{what}: {_STATUS.get(status, f'status {status}')}" + (f" ({cuda})" if cuda else ""))


_LIB: _Lib | None = None
_LIB_ERROR: str | None = None
_LOCK = threading.Lock()


def _load() -> _Lib | None:
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    with _LOCK:
        if _LIB is None and _LIB_ERROR is None:
            path = library_path()
            if path is None or not path.is_file():
                _LIB_ERROR = (f"{LIB_NAME} is not built ({path or 'build/csrc/'}): run bash tools/build_csrc.sh "
                              f"(or set {LIB_ENV})")
            else:
                try:
                    _LIB = _Lib(path)
                except (OSError, AttributeError, CutlassSparseError) as e:
                    _LIB_ERROR = f"cannot load {path}: {str(e).splitlines()[0]}"
    return _LIB


def _device_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (the CUTLASS sparse GEMM needs an sm_90 GPU: H100/H200)"
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return f"the GPU is sm_{cap[0]}{cap[1]}; the CUTLASS sparse GEMM is built for sm_90a (H100/H200) only"
    return None


def why_unavailable() -> str | None:
    """None if scaled_sparse_mm can run here, else the reason in one line. Never raises."""
    try:
        if _load() is None:
            return _LIB_ERROR
        if not _LIB.index:
            return f"{_LIB.path} holds no configuration: rebuild with bash tools/build_csrc.sh"
        return _device_problem()
    except Exception as e:  # noqa: BLE001 - the contract is "never raises"
        return f"CUTLASS sparse GEMM unavailable: {type(e).__name__}: {e}"


def available() -> bool:
    return why_unavailable() is None


def _lib() -> _Lib:
    lib = _load()
    if lib is None:
        raise CutlassSparseError(_LIB_ERROR)
    return lib


def build_info() -> str:
    return _lib().build_info


# ----------------------------------------------------------------------------- configurations

def _variants(name: str, info: dict) -> list[str]:
    """The run-time variants worth a tuner's time: tile-order swizzles for every configuration,
    and for a stream-K one its stream-K and split-K decompositions."""
    out = [name] + [f"{name}:sw{s}" for s in _SWIZZLES]
    if _SCHED_NAME[info["schedule"]] == "streamk":
        out += [f"{name}:streamk"] + [f"{name}:split{s}" for s in _SPLITS]
    return out


def configs(dtype: torch.dtype, out_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Names of the compiled configurations (with run-time options) for x'/W' dtype -> out_dtype."""
    lib = _lib()
    want = (_IN_CODE.get(dtype), _OUT_CODE.get(out_dtype))
    out = []
    for name, info in lib.info.items():
        if (info["in_dtype"], info["out_dtype"]) == want and not info["plain_epilogue"]:
            out += _variants(name, info)
    return out


def _parse_config(config: str) -> tuple[str, dict]:
    """'BASE[:opt]...' with opt one of streamk, split<N>, sw<N> (1, 2, 4, 8), rasterm, rastern."""
    base, *opts = config.split(":")
    o = dict(mode=0, splits=1, swizzle=1, raster=0)
    for opt in opts:
        if opt == "streamk":
            o["mode"] = _MODE["streamk"]
        elif opt.startswith("split") and opt[5:].isdigit() and int(opt[5:]) >= 1:
            o["mode"], o["splits"] = _MODE["splitk"], int(opt[5:])
        elif opt.startswith("sw") and opt[2:] in ("1", "2", "4", "8"):
            o["swizzle"] = int(opt[2:])
        elif opt in _RASTER:
            o["raster"] = _RASTER[opt]
        else:
            raise CutlassSparseError(f"bad configuration option {opt!r} in {config!r}: expected streamk, split<N>, "
                                     f"sw1|sw2|sw4|sw8, rasterm or rastern")
    return base, o


def config_info(name: str) -> dict:
    base, opts = _parse_config(name)
    lib = _lib()
    if base not in lib.info:
        raise CutlassSparseError(f"unknown CUTLASS sparse configuration {base!r}; compiled: {sorted(lib.info)}")
    d = dict(lib.info[base])
    d.update(name=name, schedule_name=_SCHED_NAME[d["schedule"]], **opts)
    return d


def default_config(dtype: torch.dtype, m: int, out_dtype: torch.dtype = torch.bfloat16) -> str:
    """A configuration without tuning, by M bucket: the single choice with the smallest mean
    regret over the Qwen2.5-7B and Llama-3.2-1B layers measured on the H200
    (results/H200/cutlass/summary.md): ping-pong 64x64 (K 256) up to M=256, cooperative 128x256
    with the weight tile multicast up to 2048, with the x' tile multicast above. Tuning (per layer
    and M bucket, over configs()) gains 1-15% on top; the tuner should always measure."""
    names = configs(dtype, out_dtype)
    if not names:
        raise CutlassSparseError(f"no CUTLASS sparse configuration compiled for {dtype} -> {out_dtype}")
    prefix = f"{_CODE_NAME[_IN_CODE[dtype]]}_{_CODE_NAME[_OUT_CODE[out_dtype]]}_"
    if m <= 256:
        want = "pingpong_64x64x256_c1x1:sw2"
    elif m <= 2048:
        want = "coop_128x256x128_c1x2:sw2"
    else:
        want = "coop_128x256x128_c2x1"
    for cand in (prefix + want, prefix + "coop_128x256x128_c1x2"):  # fp16 builds have fewer tiles
        if cand in names:
            return cand
    return names[0]


# ----------------------------------------------------------------------------- compressed weight

def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class CompressedWeight:
    """The weight in CUTLASS's SM90 sparse layout. n: output channels; k: the GEMM's K' (x' must
    have exactly k columns). values [n, k/2] in the weight dtype; meta uint8, flat."""

    values: torch.Tensor
    meta: torch.Tensor
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype


def meta_to_cutlass(meta_rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-row packed metadata [n, >= ceil(k/8)] uint8 (pattern.pack's nibbles) -> CUTLASS's
    flat metadata (any device; pure layout, the nibbles are unchanged)."""
    rows, kb = _round_up(n, _META_ATOM_ROWS), _round_up(k, _META_ATOM_COLS) // 8
    m = torch.zeros(rows, kb, dtype=torch.uint8, device=meta_rows.device)
    used = min(meta_rows.shape[1], k // 8)
    m[:n, :used] = meta_rows[:, :used]
    return m.view(rows, kb // 16, 16).transpose(0, 1).contiguous().view(-1)


def meta_from_cutlass(meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of meta_to_cutlass: -> [n, k/8] per-row metadata bytes."""
    rows, kb = _round_up(n, _META_ATOM_ROWS), _round_up(k, _META_ATOM_COLS) // 8
    if meta.numel() != rows * kb:
        raise CutlassSparseError(f"metadata has {meta.numel()} bytes, expected {rows * kb} for n={n}, k={k}")
    return meta.view(kb // 16, rows, 16).transpose(0, 1).reshape(rows, kb)[:n, : k // 8]


def _check_k(kp: int, k: int | None) -> int:
    k = padded_k(kp) if k is None else int(k)
    if k < kp or k % 32:
        raise CutlassSparseError(f"k={k} must be a multiple of 32 and at least the weight's K'={kp}")
    return k


def compress_packed(values: torch.Tensor, meta: torch.Tensor, k: int | None = None) -> CompressedWeight:
    """The project's packed 2:4 form (values [N, K'/2] int8|float8_e4m3fn, meta uint8 [N, ceil(K'/8)],
    as pattern.pack writes it and the checkpoint stores it) -> CompressedWeight on values' device.
    A pure layout change (no kernel of our own): pad K' to k, block the metadata."""
    if values.dtype not in _IN_CODE:
        raise CutlassSparseError(f"weight dtype {values.dtype} is not supported (int8 or float8_e4m3fn)")
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.uint8 or meta.shape[0] != values.shape[0]:
        raise CutlassSparseError(f"packed shapes do not match: values {tuple(values.shape)}, "
                                 f"meta {tuple(meta.shape)} {meta.dtype}")
    n, kh = values.shape
    kp = 2 * kh
    if kp % 4 or meta.shape[1] != -(-kp // 8):
        raise CutlassSparseError(f"packed shapes do not match: values {tuple(values.shape)} imply K'={kp}, "
                                 f"meta has {meta.shape[1]} bytes per row, expected {-(-kp // 8)}")
    if n % N_ALIGN:
        raise CutlassSparseError(f"N={n} must be a multiple of {N_ALIGN} (16-byte output rows); pad the weight")
    k = _check_k(kp, k)
    bits = values.view(torch.uint8)
    vals = torch.zeros(n, k // 2, dtype=torch.uint8, device=values.device)
    vals[:, :kh] = bits
    mrows = torch.zeros(n, k // 8, dtype=torch.uint8, device=values.device)
    mrows[:, : meta.shape[1]] = meta
    return CompressedWeight(vals.view(values.dtype), meta_to_cutlass(mrows, n, k), n, k)


def _pack_bits(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 [N, K'] (K' % 4 == 0) -> (values, per-row meta nibbles), the encoding of pattern.pack,
    computed on the bit pattern so that it runs on CUDA for fp8 (torch has few fp8 CUDA ops) and
    needs no import from the package. -0.0 counts as zero."""
    n, kp = w.shape
    bits = w.view(torch.uint8).reshape(n, kp // 4, 4)
    mask = 0x7F if w.dtype == torch.float8_e4m3fn else 0xFF
    nz = (bits & mask) != 0
    if bool((nz.sum(-1) > 2).any()):
        raise CutlassSparseError("weight is not 2:4 sparse (a window of 4 has more than 2 non-zeros); slide it first")
    key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(-1)[..., :2].sort(-1).values
    vals = torch.gather(bits * nz, 2, pos).reshape(n, kp // 2)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    return vals.view(w.dtype), nib[:, 0::2] | (nib[:, 1::2] << 4)


def compress(w_slid: torch.Tensor, k: int | None = None) -> CompressedWeight:
    """The slid 2:4 weight [N, K'] (int8 | float8_e4m3fn, on the GPU) -> CompressedWeight, once at
    load. K' is zero-padded to k (default padded_k(K')); N must be a multiple of 8."""
    if not w_slid.is_cuda:
        raise CutlassSparseError("compress needs the weight on a CUDA device")
    if w_slid.dtype not in _IN_CODE:
        raise CutlassSparseError(f"weight dtype {w_slid.dtype} is not supported (int8 or float8_e4m3fn)")
    if w_slid.dim() != 2 or w_slid.shape[1] % 4:
        raise CutlassSparseError(f"expected a 2-D [N, K'] weight with K' % 4 == 0, got {tuple(w_slid.shape)}")
    values, meta = _pack_bits(w_slid.contiguous())
    return compress_packed(values, meta, k)


def decompress(w: CompressedWeight) -> torch.Tensor:
    """CompressedWeight -> dense 2:4 [n, k] in its dtype (the inverse of compress)."""
    n, k = w.n, w.k
    meta = meta_from_cutlass(w.meta, n, k)
    nib = torch.stack([meta & 0xF, meta >> 4], -1).reshape(n, k // 4).to(torch.int64)
    pos = torch.stack([nib & 3, nib >> 2], -1)
    vals = w.values.view(torch.uint8).reshape(n, k // 4, 2)
    out = torch.zeros(n, k // 4, 4, dtype=torch.uint8, device=w.values.device)
    # scatter in reverse order: a (0, 0) pair (CUTLASS's empty window) keeps its first value
    out.scatter_(2, pos[..., 1:], vals[..., 1:])
    out.scatter_(2, pos[..., :1], vals[..., :1])
    return out.view(n, k).view(w.dtype)


def compress_reference(w_slid: torch.Tensor, k: int | None = None) -> CompressedWeight:
    """The same through CUTLASS's own SM90 compressor kernel (tests compare the two)."""
    lib = _lib()
    n, kp = w_slid.shape
    k = _check_k(kp, k)
    w = torch.zeros(n, k, dtype=torch.uint8, device=w_slid.device)
    w[:, :kp] = w_slid.view(torch.uint8)
    vals = torch.zeros(int(lib.ss_values_bytes(n, k)), dtype=torch.uint8, device=w.device)
    meta = torch.zeros(int(lib.ss_meta_bytes(n, k)), dtype=torch.uint8, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    st = lib.ss_compress_reference(_IN_CODE[w_slid.dtype], w.data_ptr(), vals.data_ptr(), meta.data_ptr(),
                                   n, k, stream)
    if st:
        raise lib.error(st, "CUTLASS compressor")
    return CompressedWeight(vals.view(n, k // 2).view(w_slid.dtype), meta, n, k)


# ----------------------------------------------------------------------------- the GEMM

_WS: dict[tuple, int] = {}
# What a layer's calls share, checked once: (weight, s_ch, bias, config, out_dtype) -> (index, the
# mode options, an _Args with the per-layer fields filled in). Keyed by pointers and shapes, so a
# freed and reused address with the same shapes would get the same fields it would have computed.
_PREPARED: dict[tuple, tuple] = {}


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _prepare(w: CompressedWeight, s_ch: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
             config: str, plain_ok: bool) -> tuple:
    """The checks of the per-layer operands and the configuration, done on a layer's first call."""
    lib = _lib()
    n = w.n
    if out_dtype not in _OUT_CODE:
        raise CutlassSparseError(f"out_dtype {out_dtype} is not supported (bfloat16 or float16)")
    if s_ch.dtype != torch.float32 or s_ch.shape != (n,) or not s_ch.is_contiguous():
        raise CutlassSparseError(f"s_ch must be contiguous float32 [{n}], got {s_ch.dtype} {tuple(s_ch.shape)}")
    if bias is not None and (bias.dtype != out_dtype or bias.shape != (n,) or not bias.is_contiguous()):
        raise CutlassSparseError(f"bias must be contiguous {out_dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    tensors = [w.values, w.meta, s_ch] + ([bias] if bias is not None else [])
    dev = w.values.device
    if any(t.device != dev for t in tensors) or dev.type != "cuda":
        raise CutlassSparseError("all operands must be on one CUDA device")
    # vectorised (16-byte) loads: TMA for x', W', metadata; the per-channel vectors' epilogue loads
    if not all(_aligned(t) for t in tensors):
        raise CutlassSparseError("x', the weight, s_ch and bias must start on 16-byte boundaries")
    base, opts = _parse_config(config)
    idx = lib.index.get(base)
    if idx is None:
        raise CutlassSparseError(f"unknown CUTLASS sparse configuration {base!r}; compiled: {sorted(lib.index)}")
    info = lib.info[base]
    if (info["in_dtype"], info["out_dtype"]) != (_IN_CODE[w.dtype], _OUT_CODE[out_dtype]):
        raise CutlassSparseError(f"configuration {base} is not for {w.dtype} -> {out_dtype}")
    if info["plain_epilogue"] and not plain_ok:
        raise CutlassSparseError(f"configuration {base} skips the scales and the bias (measurement only)")
    device = dev.index if dev.index is not None else torch.cuda.current_device()
    template = _Args(None, w.values.data_ptr(), w.meta.data_ptr(), None, s_ch.data_ptr(),
                     bias.data_ptr() if bias is not None else None, None, 0, n, w.k, opts["mode"], opts["splits"],
                     None, 0, None, device, opts["swizzle"], opts["raster"])
    return idx, tuple(opts.values()), template, device


def scaled_sparse_mm(x_lifted: torch.Tensor, w: CompressedWeight, s_tok: torch.Tensor, s_ch: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                     config: str | None = None, _plain_ok: bool = False) -> torch.Tensor:
    """out [M, N] = (x' @ W'^T) * s_tok[m] * s_ch[n] + bias[n] (fp32 math, one rounding to out_dtype).

    x_lifted [M, w.k] row-major, w.dtype; s_tok fp32 [M] (or [M, 1]); s_ch fp32 [N]; bias out_dtype
    [N] or None. config: a name from configs() (None: default_config).

    Outside CUDA graphs every call is host time on the step's critical path, so what depends only
    on the layer (the weight, s_ch, bias, the configuration) is checked and packed once
    (_prepare) and a call checks and fills in only x', s_tok and the output.
    """
    m, kx = x_lifted.shape
    n = w.n
    if x_lifted.dtype != w.dtype:
        raise CutlassSparseError(f"x' is {x_lifted.dtype} but the weight is {w.dtype}")
    if kx != w.k:
        raise CutlassSparseError(f"x' has K'={kx} columns, the weight was compressed for k={w.k} (pad x' with zeros)")
    if not x_lifted.is_contiguous():
        raise CutlassSparseError("x' must be row-major contiguous")
    s_tok = s_tok.reshape(-1)
    if s_tok.dtype != torch.float32 or s_tok.numel() != m or not s_tok.is_contiguous():
        raise CutlassSparseError(f"s_tok must be contiguous float32 [{m}], got {s_tok.dtype} {tuple(s_tok.shape)}")
    config = config or default_config(w.dtype, m, out_dtype)
    key = (w.values.data_ptr(), w.meta.data_ptr(), s_ch.data_ptr(), None if bias is None else bias.data_ptr(), n,
           w.k, w.dtype, s_ch.dtype, tuple(s_ch.shape), None if bias is None else (bias.dtype, tuple(bias.shape)),
           out_dtype, config, _plain_ok)
    prepared = _PREPARED.get(key)
    if prepared is None:
        prepared = _PREPARED[key] = _prepare(w, s_ch, bias, out_dtype, config, _plain_ok)
    idx, opts, template, device = prepared
    if x_lifted.get_device() != device or s_tok.get_device() != device:
        raise CutlassSparseError("all operands must be on one CUDA device")
    if x_lifted.data_ptr() % 16:
        raise CutlassSparseError("x', the weight, s_ch and bias must start on 16-byte boundaries")
    out = torch.empty(m, n, dtype=out_dtype, device=x_lifted.device)
    if m == 0:
        return out
    lib = _lib()
    args = _Args.from_buffer_copy(template)
    args.x, args.s_tok, args.out, args.m = x_lifted.data_ptr(), s_tok.data_ptr(), out.data_ptr(), m
    args.stream = raw_stream(device)
    ws_key = (idx, m, n, w.k, device, *opts)
    ws_bytes = _WS.get(ws_key)
    if ws_bytes is None:
        size = ctypes.c_size_t(0)
        st = lib.ss_workspace_size(idx, ctypes.byref(args), ctypes.byref(size))
        if st:
            raise lib.error(st, f"CUTLASS sparse GEMM {config} (M={m}, N={n}, K'={w.k})")
        ws_bytes = _WS[ws_key] = int(size.value)
    if ws_bytes:
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x_lifted.device)
        args.workspace, args.workspace_bytes = ws.data_ptr(), ws_bytes
    if device != torch._C._cuda_getDevice():
        with torch.cuda.device(device):
            st = lib.ss_run(idx, ctypes.byref(args))
    else:
        st = lib.ss_run(idx, ctypes.byref(args))
    if st:
        raise lib.error(st, f"CUTLASS sparse GEMM {config} (M={m}, N={n}, K'={w.k})")
    return out


def lift_available() -> bool:
    """True if the library loads here and has the native lift (csrc/ss_lift.cu). Never raises."""
    try:
        return available() and _lib().ss_lift_codes is not None
    except Exception:  # noqa: BLE001
        return False


def lift_into(q: torch.Tensor, out: torch.Tensor, m: int, p: int, w: int, inf: bool) -> None:
    """The native lift (ss_lift.h): q [m, K] 1-byte codes (K even, rows 2-byte aligned) -> out
    [MP, K'] (16-byte aligned rows, K' % 16 == 0), rows m..MP and columns past the groups zeroed.
    The caller (kernels/quant_slide.lift_codes) has checked shapes and dtypes; this checks what the
    kernel's vector stores need and reports the library's status in one line."""
    lib = _lib()
    args = _LiftArgs(q.data_ptr(), out.data_ptr(), m, out.shape[0], q.shape[1], out.shape[1], q.stride(0),
                     out.stride(0), p, w, int(inf), 0, raw_stream(q.get_device()))
    st = lib.ss_lift_codes(ctypes.byref(args))
    if st:
        raise lib.error(st, f"lift of [{m}, {q.shape[1]}] codes into [{out.shape[0]}, {out.shape[1]}]")


def plain_configs() -> list[str]:
    """Configurations compiled with the plain epilogue (acc -> bf16, no scales, no bias)."""
    return [n for n, i in _lib().info.items() if i["plain_epilogue"]]


def unscaled_mm_for_measurement(x_lifted: torch.Tensor, w: CompressedWeight, config: str) -> torch.Tensor:
    """x' @ W'^T rounded to bf16, through a plain-epilogue configuration: the same mainloop and
    store as its scaled twin, so the time difference is the epilogue visitor tree's. Not for serving."""
    m = x_lifted.shape[0]
    ones_m = torch.ones(m, dtype=torch.float32, device=x_lifted.device)
    ones_n = torch.ones(w.n, dtype=torch.float32, device=x_lifted.device)
    return scaled_sparse_mm(x_lifted, w, ones_m, ones_n, None, torch.bfloat16, config, _plain_ok=True)
