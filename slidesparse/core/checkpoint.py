"""Reading checkpoints: a streaming, validating safetensors reader, and converted layers read back.

    Checkpoint(path)           config.json + every safetensors header, validated; get(name) reads one tensor
    checkpoint_kind(ckpt)      "slidesparse" (with its config) or "compressed-tensors" (the dense export)
    load_layer(ckpt, prefix)   one converted layer: packed tensors -> slid [N, K'] -> dense w_q [N, K]
    dense_weights(ckpt)        every converted layer as (module, w_q [N, K], scale [N] | None)
    first_nonfinite(t)         where a float tensor holds its first NaN / Inf (None if it holds none)


Headers of every file are parsed and checked up front (header length, JSON, dtypes, non-negative
dimensions, offsets that tile the data exactly, byte counts against dtype x shape), so a truncated
or corrupt file fails with a clear error naming it before any output is written. Tensors are then
read one at a time with plain reads at the validated offsets (not memory-mapped: mapped pages of a
multi-GB file would count towards the process's resident memory), so peak memory is about one
tensor, not the model.

Only files inside the model folder are opened: an index entry must be a plain file name, and a
symlink must resolve inside the folder (or, for the Hugging Face hub cache, whose snapshot files
are symlinks into the repository's blobs/, inside that blobs/ folder). Only regular files are
opened, non-blocking, so a FIFO or a device in the folder is refused instead of hanging the reader.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import SlideSparseError
from .errors import shown as _short
from .format import SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, FormatError, SlideSparseConfig, layer_shapes
from .layout import layer_key
from .pattern import unpack, unslide
from .quant import DTYPES


class CheckpointError(SlideSparseError):
    """A checkpoint folder that cannot be read: missing, truncated or corrupt files, bad index."""

# safetensors dtype strings -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
# a sane upper bound for a JSON header; the format itself caps it at 100 MB
MAX_HEADER = 100 * 1024 * 1024
# config.json and the index are a few hundred KB even for the largest models
MAX_JSON = 64 * 1024 * 1024
# no tensor of a supported model has more dimensions; the cap keeps a hostile header cheap to check
MAX_RANK = 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


# ----------------------------------------------------------------------------- opening files

def _roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of the model folder may live (resolved): the folder itself and, for a
    Hugging Face hub cache snapshot (<repo>/snapshots/<rev>), the repository's blobs/ folder."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots":
        return real, real.parent.parent / "blobs"
    return (real,)


def model_file(folder: Path, name: str, what: str = "file") -> Path:
    """The resolved path of `name`, a file of the model folder; CheckpointError if `name` is not a
    plain file name, or resolves (through symlinks) outside the folder. Existence is not checked."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise CheckpointError(f"{folder}: {what} {_short(name)} is not a file name in the model folder")
    real = Path(os.path.realpath(folder / name))
    if not any(real == r or r in real.parents for r in _roots(folder)):
        raise CheckpointError(f"{folder}: {what} {_short(name)} is a symlink to {_short(str(real), 200)}, outside the model "
                              "folder; copy the file into the folder")
    return real


def open_regular(path: Path, shown: Path | None = None):
    """Open an existing regular file for binary reading, refusing anything else (a FIFO would block
    open() until some writer appears; a device could be endless). CheckpointError on failure."""
    shown = shown or path
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CheckpointError(f"{shown}: not a regular file")
        # O_NONBLOCK: if the path is swapped for a FIFO after the stat, open() still returns
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{shown}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot open ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{shown}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_short(k)}")
        d[k] = v
    return d


def _parse_json(raw: bytes, shown: Path, what: str):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = str(e).splitlines()[0][:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise CheckpointError(f"{shown}: {what} is not valid JSON ({why})") from None


def _int(v) -> bool:
    return type(v) is int  # JSON true/false are bools, which Python also counts as int


def read_header(path: Path, shown: Path | None = None) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int]], int]:
    """Parse and validate one safetensors header: ({name: (dtype, shape, data offset)}, byte where
    the data starts); CheckpointError naming the file if it is damaged."""
    shown = shown or path
    with open_regular(path, shown) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{shown}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{shown}: corrupt or truncated safetensors file "
                                      f"(header claims {n} bytes, file has {size})")
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{shown}: cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise CheckpointError(f"{shown}: truncated while reading the header")
    header = _parse_json(raw, shown, "the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown}: corrupt safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{shown}: corrupt safetensors file (__metadata__ is not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    spans = []
    for name, e in header.items():
        def bad(why: str):
            return CheckpointError(f"{shown}: corrupt safetensors file (tensor {_short(name)}: {why})")
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise bad("needs dtype, shape and data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise bad(f"dtype {_short(dt)} is not one of {', '.join(ST_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_int(s) and s >= 0 for s in shape):
            raise bad(f"shape {_short(shape)} is not a list of at most {MAX_RANK} non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"data_offsets {_short(offs)} are not [begin, end] with 0 <= begin <= end")
        begin, end = offs
        want = math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dt]).element_size()
        if end - begin != want:
            raise bad(f"{end - begin} bytes for dtype {dt} shape {shape}, expected {want}")
        if end > data_len:
            raise CheckpointError(f"{shown}: truncated safetensors file (tensor {_short(name)} ends at byte {end} "
                                  f"of the data, but the file holds only {data_len})")
        out[name] = (ST_DTYPES[dt], tuple(shape), 8 + n + begin)
        spans.append((begin, end, name))
    # the tensors must tile the data exactly, as the format requires: no overlaps, no gaps
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise CheckpointError(f"{shown}: corrupt safetensors file (tensor {_short(name)} starts at byte {begin} of "
                                  f"the data; the tensors before it end at {pos}: "
                                  f"{'overlap' if begin < pos else 'a gap'})")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{shown}: corrupt safetensors file ({data_len - pos} unindexed bytes at the end)")
    return out, 8 + n


def load_json(path: Path, what: str, real: Path | None = None) -> dict:
    """A JSON object from a file of the model folder (`real`: its resolved path, if already known)."""
    if real is None:
        real = model_file(path.parent, path.name, what)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})")
    with open_regular(real, path) as f:
        try:
            raw = f.read(MAX_JSON + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) > MAX_JSON:
        raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON // 2**20} MB; not a model's JSON file")
    d = _parse_json(raw, path, what)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return d


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Checkpoint:
    """A checkpoint directory: config.json, and one safetensors file or a sharded set with index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        self.config = load_json(self.path / "config.json", "the model config")
        self.tensors: dict[str, TensorInfo] = {}
        self._real: dict[Path, Path] = {}  # file (as shown) -> resolved path inside the folder
        for file in self._files():
            header, _ = read_header(self._real[file], file)
            for name, (dtype, shape, offset) in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {_short(name)} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = TensorInfo(name, file, dtype, shape, offset)

    def file(self, name: str, what: str = "file") -> Path | None:
        """The resolved path of an optional file of the folder (tokenizer.json, ...): None if it is
        absent; CheckpointError if it escapes the folder or is not a regular file."""
        if not os.path.lexists(self.path / name):
            return None
        real = model_file(self.path, name, what)
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise CheckpointError(f"{self.path / name}: not a regular file")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path / name}: a broken symlink") from None
        return real

    def _files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if os.path.lexists(index):
            wm = load_json(index, "the safetensors index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: no weight_map (an object of tensor name -> file name)")
            for name, f in wm.items():
                if not isinstance(f, str):
                    raise CheckpointError(f"{index}: tensor {_short(name)} maps to {_short(f)}, not a file name")
            for f in sorted(set(wm.values())):
                real = model_file(self.path, f, f"{INDEX_NAME} entry")
                if not real.is_file():
                    raise CheckpointError(f"{index}: lists {_short(f)}, which is missing"
                                          if not real.exists() else f"{index}: lists {_short(f)}, not a regular file")
                self._real[self.path / f] = real
            self._index = wm
            return sorted(self._real)
        self._index = None
        # hidden files (macOS "._x.safetensors" and the like) are not weights
        for f in sorted(self.path.glob("*.safetensors")):
            if not f.name.startswith("."):
                self._real[f] = model_file(self.path, f.name)
        if not self._real:
            raise CheckpointError(f"{self.path}: no *.safetensors weights found")
        return sorted(self._real)

    def check_index(self) -> None:
        """Every tensor the index names is in the file it names (and no file holds extras)."""
        if self._index is None:
            return
        for name, f in self._index.items():
            info = self.tensors.get(name)
            if info is None or info.file != self.path / f:
                raise CheckpointError(f"{self.path / INDEX_NAME}: tensor {_short(name)} is not in {_short(f)}")
        extra = set(self.tensors) - set(self._index)
        if extra:
            raise CheckpointError(f"{self.path / INDEX_NAME}: does not list {_short(sorted(extra)[0])} "
                                  f"(and {len(extra) - 1} more)")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        info = self.tensors[name]
        mem = _memory_bytes()
        if mem is not None and info.nbytes > mem:
            raise CheckpointError(f"{info.file}: tensor {name!r} needs {info.nbytes / 1e9:.1f} GB, more than this "
                                  f"machine's {mem / 1e9:.1f} GB of memory")
        try:
            out = torch.empty(info.nbytes, dtype=torch.uint8)
        except RuntimeError:
            raise CheckpointError(f"{info.file}: cannot allocate {info.nbytes / 1e9:.1f} GB for tensor {name!r}") from None
        with open_regular(self._real[info.file], info.file) as f:
            try:
                f.seek(info.offset)
                got = f.readinto(memoryview(out.numpy()))
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e.strerror or e})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return out.view(info.dtype).reshape(info.shape)


def first_nonfinite(t: torch.Tensor, step: int = 1 << 24) -> tuple[int, ...] | None:
    """Index of the first NaN or Inf of a float tensor (None if all finite, and for integer
    tensors), found in slices of `step` elements so the check needs little extra memory."""
    if not t.is_floating_point():
        return None
    flat = t.reshape(-1)
    for s in range(0, flat.numel(), step):
        # float8 has no isfinite kernel on CPU; widening is exact
        part = flat[s: s + step]
        bad = ~torch.isfinite(part if part.element_size() > 1 else part.float())
        if bool(bad.any()):
            i = s + int(bad.nonzero()[0, 0])
            return tuple(int(v) for v in torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else ()
    return None


# ----------------------------------------------------------------------------- converted layers

def _open(ckpt) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)


def checkpoint_kind(ckpt: Checkpoint) -> tuple[str, SlideSparseConfig | None]:
    qc = ckpt.config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{ckpt.path}: quantization_config is {type(qc).__name__}, not a JSON object")
    qc = qc or {}
    method = qc.get("quant_method")
    if method == "slidesparse":
        ignore, source = qc.get("ignore", []), qc.get("source", {})
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise CheckpointError(f"{ckpt.path}: quantization_config.ignore must be a list of patterns, got {_short(ignore)}")
        if not isinstance(source, dict):
            raise CheckpointError(f"{ckpt.path}: quantization_config.source must be an object, got {_short(source)}")
        try:
            return "slidesparse", SlideSparseConfig.from_dict(qc)
        except FormatError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    if method == "compressed-tensors":
        return "compressed-tensors", None
    raise CheckpointError(f"{ckpt.path}: not a converted checkpoint (quantization_config.quant_method={_short(method)})")


def load_layer(ckpt_dir, prefix: str) -> dict:
    """One converted layer, unpacked and checked.

    Returns {"weight": dense unslid w_q [N, K] (storage dtype: fp8/int8 codes or bf16/fp16),
    "slid": [N, K'] 2:4 weight (None for compressed-tensors), "scale": float32 [N] or None,
    "bias": [N] or None, "pattern": Pattern or None, "shape": (N, K)}.
    Raises CheckpointError / PatternError if the stored tensors are inconsistent.
    """
    ckpt = _open(ckpt_dir)
    kind, cfg = checkpoint_kind(ckpt)

    def info(name: str, dtypes, shape=None, what: str = "") -> TensorInfo:
        i = ckpt.tensors.get(name)
        if i is None:
            raise CheckpointError(f"{ckpt.path}: {name} is missing")
        if i.dtype not in dtypes:
            raise CheckpointError(f"{ckpt.path}: {name} is {TORCH_TO_ST[i.dtype]}, expected "
                                  f"{' or '.join(TORCH_TO_ST[d] for d in dtypes)}")
        if shape is not None and i.shape != shape:
            raise CheckpointError(f"{ckpt.path}: {name} has shape {list(i.shape)}, expected {list(shape)}{what}")
        return i

    floats = (torch.float32, torch.float16, torch.bfloat16)
    if kind == "compressed-tensors":
        if prefix + ".weight_scale" not in ckpt:
            raise CheckpointError(f"{ckpt.path}: {prefix} is not a quantized layer")
        wi = info(prefix + ".weight", (torch.int8, torch.float8_e4m3fn))
        if len(wi.shape) != 2:
            raise CheckpointError(f"{ckpt.path}: {prefix}.weight has shape {list(wi.shape)}, expected [N, K]")
        n = wi.shape[0]
        si = info(prefix + ".weight_scale", floats)
        if si.shape not in ((n, 1), (n,)):
            raise CheckpointError(f"{ckpt.path}: {prefix}.weight_scale has shape {list(si.shape)}, expected [{n}, 1]")
        bias = ckpt.get(prefix + ".bias") if prefix + ".bias" in ckpt else None
        if bias is not None:
            info(prefix + ".bias", floats, (n,))
        w = ckpt.get(prefix + ".weight")
        return {"weight": w, "slid": None, "scale": ckpt.get(prefix + ".weight_scale").float().reshape(-1),
                "bias": bias, "pattern": None, "shape": tuple(w.shape)}
    name = {s: f"{prefix}.{s}" for s in (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)}
    if name[SUFFIX_VALUES] not in ckpt:
        raise CheckpointError(f"{ckpt.path}: {prefix} is not a converted layer (no {name[SUFFIX_VALUES]})")
    info(name[SUFFIX_SHAPE], (torch.int64,), (2,))
    n, k = (int(v) for v in ckpt.get(name[SUFFIX_SHAPE]).tolist())
    if n < 1 or k < 1:
        raise CheckpointError(f"{ckpt.path}: {name[SUFFIX_SHAPE]} holds [{n}, {k}], not a layer shape")
    want = layer_shapes(n, k, cfg)
    what = f" for a {n}x{k} {cfg.sparsity} layer"
    info(name[SUFFIX_VALUES], (DTYPES[cfg.weight_dtype],), want[SUFFIX_VALUES], what)
    info(name[SUFFIX_META], (torch.uint8,), want[SUFFIX_META], what)
    if cfg.quantized:
        info(name[SUFFIX_SCALE], (torch.float32,), want[SUFFIX_SCALE], what)
    bias = None
    if prefix + ".bias" in ckpt:
        info(prefix + ".bias", floats, (n,))
        bias = ckpt.get(prefix + ".bias")
    slid = unpack(ckpt.get(name[SUFFIX_VALUES]), ckpt.get(name[SUFFIX_META]), cfg.pattern)
    weight = unslide(slid, cfg.pattern, k)
    scale = ckpt.get(name[SUFFIX_SCALE]) if cfg.quantized else None
    return {"weight": weight, "slid": slid, "scale": scale, "bias": bias, "pattern": cfg.pattern, "shape": (n, k)}


def converted_modules(ckpt_dir) -> list[str]:
    """Names of the converted (sparse or quantized) layers, in layer order."""
    ckpt = _open(ckpt_dir)
    kind, _ = checkpoint_kind(ckpt)
    suffix = "." + (SUFFIX_VALUES if kind == "slidesparse" else "weight_scale")
    return sorted((n[: -len(suffix)] for n in ckpt.tensors if n.endswith(suffix)), key=layer_key)


def dense_weights(ckpt_dir) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield (module_name, w_q [N, K] in the storage dtype, scale float32 [N] or None) per converted
    layer: the pruned + quantized weights exactly as the checkpoint defines them. The real-valued
    weight is quant.dequantize(w_q, scale)."""
    ckpt = _open(ckpt_dir)
    for m in converted_modules(ckpt):
        d = load_layer(ckpt, m)
        yield m, d["weight"], d["scale"]
