"""Reading converted checkpoints back: the dense, unslid weights every reference path uses.

    load_layer(ckpt, prefix)   one layer: packed tensors -> slid [N, K'] -> dense w_q [N, K]
    dense_weights(ckpt)        every converted layer as (module, w_q [N, K], scale [N] | None)

Both accept SlideSparse checkpoints and the dense compressed-tensors W8A8 exports of `convert
--format compressed-tensors`, so a reference forward can run either.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..format import (SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, FormatError, SlideSparseConfig,
                      layer_shapes)
from ..pattern import unpack, unslide
from ..quant import DTYPES
from .arch import layer_key
from .errors import ConvertError
from .reader import Checkpoint


def _open(ckpt) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)


def checkpoint_kind(ckpt: Checkpoint) -> tuple[str, SlideSparseConfig | None]:
    qc = ckpt.config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "slidesparse":
        try:
            return "slidesparse", SlideSparseConfig.from_dict(qc)
        except FormatError as e:
            raise ConvertError(f"{ckpt.path}: {e}") from None
    if method == "compressed-tensors":
        return "compressed-tensors", None
    raise ConvertError(f"{ckpt.path}: not a converted checkpoint (quantization_config.quant_method={method!r})")


def load_layer(ckpt_dir, prefix: str) -> dict:
    """One converted layer, unpacked and checked.

    Returns {"weight": dense unslid w_q [N, K] (storage dtype: fp8/int8 codes or bf16/fp16),
    "slid": [N, K'] 2:4 weight (None for compressed-tensors), "scale": float32 [N] or None,
    "bias": [N] or None, "pattern": Pattern or None, "shape": (N, K)}.
    Raises ConvertError / PatternError if the stored tensors are inconsistent.
    """
    ckpt = _open(ckpt_dir)
    kind, cfg = checkpoint_kind(ckpt)
    bias = ckpt.get(prefix + ".bias") if prefix + ".bias" in ckpt else None
    if kind == "compressed-tensors":
        if prefix + ".weight_scale" not in ckpt:
            raise ConvertError(f"{ckpt.path}: {prefix} is not a quantized layer")
        w = ckpt.get(prefix + ".weight")
        return {"weight": w, "slid": None, "scale": ckpt.get(prefix + ".weight_scale").float().reshape(-1),
                "bias": bias, "pattern": None, "shape": tuple(w.shape)}
    name = {s: f"{prefix}.{s}" for s in (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)}
    if name[SUFFIX_VALUES] not in ckpt:
        raise ConvertError(f"{ckpt.path}: {prefix} is not a converted layer (no {name[SUFFIX_VALUES]})")
    for s in (SUFFIX_META, SUFFIX_SHAPE):
        if name[s] not in ckpt:
            raise ConvertError(f"{ckpt.path}: {name[s]} is missing")
    n, k = (int(v) for v in ckpt.get(name[SUFFIX_SHAPE]).tolist())
    want = layer_shapes(n, k, cfg)
    for s, shape in want.items():
        info = ckpt.tensors.get(name[s])
        if info is None or info.shape != shape:
            raise ConvertError(f"{ckpt.path}: {name[s]} has shape {list(info.shape) if info else None}, "
                               f"expected {list(shape)} for a {n}x{k} {cfg.sparsity} layer")
    values = ckpt.get(name[SUFFIX_VALUES])
    if values.dtype != DTYPES[cfg.weight_dtype]:
        raise ConvertError(f"{ckpt.path}: {name[SUFFIX_VALUES]} is {values.dtype}, config says {cfg.weight_dtype}")
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
