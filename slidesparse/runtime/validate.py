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

from safetensors import safe_open

from ..convert.pipeline import compile_ignore
from ..format import (SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, TARGET_MODULES, FormatError,
                      SlideSparseConfig, layer_shapes)

_ST_DTYPE = {"fp8_e4m3": "F8_E4M3", "int8": "I8", "bf16": "BF16", "fp16": "F16"}
_SUFFIXES = (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)
# sibling projections that a model always has together (a missing one means a truncated checkpoint)
_SIBLINGS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _ignored(name: str, cfg: SlideSparseConfig) -> bool:
    return compile_ignore(cfg.ignore)(name)  # the converter's --ignore semantics (globs, re:)


def validate_checkpoint(path: str, cfg: SlideSparseConfig) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return  # nothing local to check (vLLM reports missing weights itself)
    where = os.path.basename(os.path.normpath(path))
    tensors: dict[str, tuple[str, list[int], str]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                tensors[key] = (f, list(sl.get_shape()), sl.get_dtype())

    parts: dict[str, set[str]] = defaultdict(set)   # converted module -> suffixes present
    dense: set[str] = set()                          # target modules stored as a plain .weight
    for key in tensors:
        mod, _, suffix = key.rpartition(".")
        if suffix in _SUFFIXES:
            parts[mod].add(suffix)
        elif suffix == "weight" and mod.rpartition(".")[2] in TARGET_MODULES:
            dense.add(mod)

    for mod in sorted(dense):
        if not _ignored(mod, cfg):
            raise FormatError(f"{where}: {mod}.weight is stored dense, but the quantization_config says it is "
                              f"SlideSparse {cfg.sparsity} (and does not list it in 'ignore'); re-convert the model")
    needed = {SUFFIX_VALUES, SUFFIX_META, SUFFIX_SHAPE} | ({SUFFIX_SCALE} if cfg.quantized else set())
    for mod, have in sorted(parts.items()):
        if missing := needed - have:
            raise FormatError(f"{where}: {mod}.{sorted(missing)[0]} is missing from the checkpoint; re-convert the model")
        if extra := have - needed:
            raise FormatError(f"{where}: unexpected tensor {mod}.{sorted(extra)[0]} for weight_dtype "
                              f"{cfg.weight_dtype}; the checkpoint does not match its quantization_config")
        f, _, _ = tensors[f"{mod}.{SUFFIX_SHAPE}"]
        with safe_open(f, framework="pt") as st:
            n, k = (int(v) for v in st.get_tensor(f"{mod}.{SUFFIX_SHAPE}").tolist())
        for suffix, shape in layer_shapes(n, k, cfg).items():
            got = tuple(tensors[f"{mod}.{suffix}"][1])
            if got != shape:
                raise FormatError(f"{where}: {mod}.{suffix} has shape {got}, expected {shape} for a {n}x{k} layer "
                                  f"at {cfg.sparsity} (L={cfg.pattern.group}); the checkpoint's sparsity/L metadata "
                                  f"does not match its tensors")
        dt = tensors[f"{mod}.{SUFFIX_VALUES}"][2]
        if dt != _ST_DTYPE[cfg.weight_dtype]:
            raise FormatError(f"{where}: {mod}.{SUFFIX_VALUES} is {dt}, but weight_dtype is {cfg.weight_dtype}")

    present = set(parts) | dense
    for mod in sorted(present):
        block, _, _ = mod.rpartition(".")
        for sib in _SIBLINGS.get(block.rpartition(".")[2], ()):
            if f"{block}.{sib}" not in present:
                raise FormatError(f"{where}: {block}.{sib} is missing from the checkpoint (no weight tensors)")
