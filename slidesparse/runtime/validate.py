"""Up-front checks of a SlideSparse checkpoint against its quantization_config.

vLLM leaves a quantized parameter uninitialised when its tensor is absent from the checkpoint
(unless weight tracking is on), and reports an extra tensor only as a missing parameter name.
Reading the safetensors headers (no tensor data except the tiny weight_shape ones) lets us say
exactly what is wrong, before any engine process starts.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict

from ..core.checkpoint import Checkpoint, CheckpointError
from ..core.format import (SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, FormatError, SlideSparseConfig,
                           layer_shapes)
from ..core.layout import BLOCKS, TARGET_MODULES, IgnoreRule
from ..core.quant import DTYPES

_SUFFIXES = (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)


def validate_checkpoint(path: str, cfg: SlideSparseConfig) -> None:
    if not glob.glob(os.path.join(path, "*.safetensors")):
        return  # nothing local to check (vLLM reports missing weights itself)
    where = os.path.basename(os.path.normpath(path))
    try:
        ckpt = Checkpoint(path)
    except CheckpointError as e:
        raise FormatError(str(e)) from None

    parts: dict[str, set[str]] = defaultdict(set)   # converted module -> suffixes present
    dense: set[str] = set()                          # target modules stored as a plain .weight
    for key in ckpt.tensors:
        mod, _, suffix = key.rpartition(".")
        if suffix in _SUFFIXES:
            parts[mod].add(suffix)
        elif suffix == "weight" and mod.rpartition(".")[2] in TARGET_MODULES:
            dense.add(mod)

    ignored = IgnoreRule(cfg.ignore)
    for mod in sorted(dense):
        if not ignored(mod):
            raise FormatError(f"{where}: {mod}.weight is stored dense, but the quantization_config says it is "
                              f"SlideSparse {cfg.sparsity} (and does not list it in 'ignore'); re-convert the model")
    needed = {SUFFIX_VALUES, SUFFIX_META, SUFFIX_SHAPE} | ({SUFFIX_SCALE} if cfg.quantized else set())
    for mod, have in sorted(parts.items()):
        if missing := needed - have:
            raise FormatError(f"{where}: {mod}.{sorted(missing)[0]} is missing from the checkpoint; re-convert the model")
        if extra := have - needed:
            raise FormatError(f"{where}: unexpected tensor {mod}.{sorted(extra)[0]} for weight_dtype "
                              f"{cfg.weight_dtype}; the checkpoint does not match its quantization_config")
        n, k = (int(v) for v in ckpt.get(f"{mod}.{SUFFIX_SHAPE}").tolist())
        for suffix, shape in layer_shapes(n, k, cfg).items():
            got = ckpt.tensors[f"{mod}.{suffix}"].shape
            if got != shape:
                raise FormatError(f"{where}: {mod}.{suffix} has shape {got}, expected {shape} for a {n}x{k} layer "
                                  f"at {cfg.sparsity} (L={cfg.pattern.group}); the checkpoint's sparsity/L metadata "
                                  f"does not match its tensors")
        dt = ckpt.tensors[f"{mod}.{SUFFIX_VALUES}"].dtype
        if dt != DTYPES[cfg.weight_dtype]:
            raise FormatError(f"{where}: {mod}.{SUFFIX_VALUES} is {dt}, but weight_dtype is {cfg.weight_dtype}")

    present = set(parts) | dense
    for mod in sorted(present):
        block, _, _ = mod.rpartition(".")
        for sib in BLOCKS.get(block.rpartition(".")[2], ()):
            if f"{block}.{sib}" not in present:
                raise FormatError(f"{where}: {block}.{sib} is missing from the checkpoint (no weight tensors)")
