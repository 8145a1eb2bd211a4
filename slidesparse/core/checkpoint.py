"""Reading checkpoints: a streaming, validating safetensors reader, and converted layers read back.

    Checkpoint(path)           config.json + every safetensors header, validated; get(name) reads one tensor
    checkpoint_kind(ckpt)      "slidesparse" (with its config) or "compressed-tensors" (the dense export)
    load_layer(ckpt, prefix)   one converted layer: packed tensors -> slid [N, K'] -> dense w_q [N, K]
    dense_weights(ckpt)        every converted layer as (module, w_q [N, K], scale [N] | None)


Headers of every file are parsed and checked up front (header length, JSON, offsets against the
file size, byte counts against dtype x shape), so a truncated or corrupt file fails with a clear
error naming it before any output is written. Tensors are then read one at a time with plain
reads at the validated offsets (not memory-mapped: mapped pages of a multi-GB file would count
towards the process's resident memory), so peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import SlideSparseError
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


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate one safetensors header; CheckpointError naming the file if it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                   f"(header claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    data_len = size - 8 - n
    end_max = 0
    for name, e in header.items():
        if name == "__data_start__":
            continue
        try:
            dt = ST_DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors file (bad entry for tensor {name!r})") from None
        want = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if begin < 0 or end - begin != want:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r}: {end - begin} bytes "
                               f"for dtype {e['dtype']} shape {shape}, expected {want})")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} "
                               f"of the data, but the file holds only {data_len})")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - end_max} unindexed bytes at the end)")
    return header


def load_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse {what}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return d


class Checkpoint:
    """A checkpoint directory: config.json, and one safetensors file or a sharded set with index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        self.config = load_json(self.path / "config.json", "the model config")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            header = read_header(file)
            start = header.pop("__data_start__")
            for name, e in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = TensorInfo(name, file, ST_DTYPES[e["dtype"]], tuple(e["shape"]),
                                                start + int(e["data_offsets"][0]))

    def _files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            wm = load_json(index, "the safetensors index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted({self.path / f for f in wm.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: lists {f.name}, which is missing")
            self._index = wm
            return files
        self._index = None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors weights found")
        return files

    def check_index(self) -> None:
        """Every tensor the index names is in the file it names (and no file holds extras)."""
        if self._index is None:
            return
        for name, f in self._index.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != f:
                raise CheckpointError(f"{self.path / INDEX_NAME}: tensor {name!r} is not in {f}")
        extra = set(self.tensors) - set(self._index)
        if extra:
            raise CheckpointError(f"{self.path / INDEX_NAME}: does not list {sorted(extra)[0]!r} "
                               f"(and {len(extra) - 1} more)")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        info = self.tensors[name]
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                got = f.readinto(memoryview(out.numpy()))
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e.strerror or e})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return out.view(info.dtype).reshape(info.shape)


# ----------------------------------------------------------------------------- converted layers

def _open(ckpt) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)


def checkpoint_kind(ckpt: Checkpoint) -> tuple[str, SlideSparseConfig | None]:
    qc = ckpt.config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "slidesparse":
        try:
            return "slidesparse", SlideSparseConfig.from_dict(qc)
        except FormatError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    if method == "compressed-tensors":
        return "compressed-tensors", None
    raise CheckpointError(f"{ckpt.path}: not a converted checkpoint (quantization_config.quant_method={method!r})")


def load_layer(ckpt_dir, prefix: str) -> dict:
    """One converted layer, unpacked and checked.

    Returns {"weight": dense unslid w_q [N, K] (storage dtype: fp8/int8 codes or bf16/fp16),
    "slid": [N, K'] 2:4 weight (None for compressed-tensors), "scale": float32 [N] or None,
    "bias": [N] or None, "pattern": Pattern or None, "shape": (N, K)}.
    Raises CheckpointError / PatternError if the stored tensors are inconsistent.
    """
    ckpt = _open(ckpt_dir)
    kind, cfg = checkpoint_kind(ckpt)
    bias = ckpt.get(prefix + ".bias") if prefix + ".bias" in ckpt else None
    if kind == "compressed-tensors":
        if prefix + ".weight_scale" not in ckpt:
            raise CheckpointError(f"{ckpt.path}: {prefix} is not a quantized layer")
        w = ckpt.get(prefix + ".weight")
        return {"weight": w, "slid": None, "scale": ckpt.get(prefix + ".weight_scale").float().reshape(-1),
                "bias": bias, "pattern": None, "shape": tuple(w.shape)}
    name = {s: f"{prefix}.{s}" for s in (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)}
    if name[SUFFIX_VALUES] not in ckpt:
        raise CheckpointError(f"{ckpt.path}: {prefix} is not a converted layer (no {name[SUFFIX_VALUES]})")
    for s in (SUFFIX_META, SUFFIX_SHAPE):
        if name[s] not in ckpt:
            raise CheckpointError(f"{ckpt.path}: {name[s]} is missing")
    n, k = (int(v) for v in ckpt.get(name[SUFFIX_SHAPE]).tolist())
    want = layer_shapes(n, k, cfg)
    for s, shape in want.items():
        info = ckpt.tensors.get(name[s])
        if info is None or info.shape != shape:
            raise CheckpointError(f"{ckpt.path}: {name[s]} has shape {list(info.shape) if info else None}, "
                               f"expected {list(shape)} for a {n}x{k} {cfg.sparsity} layer")
    values = ckpt.get(name[SUFFIX_VALUES])
    if values.dtype != DTYPES[cfg.weight_dtype]:
        raise CheckpointError(f"{ckpt.path}: {name[SUFFIX_VALUES]} is {values.dtype}, config says {cfg.weight_dtype}")
    slid = unpack(values, ckpt.get(name[SUFFIX_META]), cfg.pattern)
    weight = unslide(slid, cfg.pattern, k)
    scale = ckpt.get(name[SUFFIX_SCALE]).float() if cfg.quantized else None
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
