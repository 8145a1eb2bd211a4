"""compressed-tensors W8A8 checkpoints: reading them as a source, and writing the dense baseline.

Supported source (what llm-compressor writes for W8A8 with channel weight scales):
    quantization_config = {quant_method: "compressed-tensors", format: "int-quantized" |
        "float-quantized" | "naive-quantized", config_groups: {<g>: {targets: [...],
        weights: {num_bits: 8, type: "int" | "float", strategy: "channel", symmetric: true},
        input_activations: {num_bits: 8, dynamic: true, strategy: "token", ...} }}, ignore: [...]}
    <module>.weight int8 | float8_e4m3fn [N, K], <module>.weight_scale [N, 1] (or [N]).

The dense export is the same scheme in the same layout, with float32 scales equal to
slidesparse.quant.quantize_weight's, and no sparsity_config (vLLM >= 0.24 rejects one).
"""

from __future__ import annotations

import fnmatch

from .errors import ConvertError

QUANT_METHOD = "compressed-tensors"
_TYPES = {"int": "int8", "float": "fp8_e4m3"}


def source_dtype(qc: dict) -> str:
    """The storage dtype of a supported compressed-tensors W8A8 source; ConvertError otherwise."""
    groups = qc.get("config_groups") or {}
    if qc.get("sparsity_config"):
        raise ConvertError("compressed-tensors source has a sparsity_config: only dense W8A8 sources are supported")
    fmt = qc.get("format")
    if fmt not in ("int-quantized", "float-quantized", "naive-quantized"):
        raise ConvertError(f"compressed-tensors source format {fmt!r} is not supported "
                           "(need int-quantized / float-quantized W8A8)")
    dtypes = set()
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        a = (g or {}).get("input_activations") or {}
        ok = (w.get("num_bits") == 8 and w.get("type") in _TYPES and w.get("strategy") == "channel"
              and w.get("symmetric", True) and not w.get("dynamic", False)
              and a.get("num_bits", 8) == 8 and a.get("dynamic") is True and a.get("strategy") == "token")
        if not ok:
            raise ConvertError(f"compressed-tensors config group {name!r} is not W8A8 with per-channel symmetric "
                               "weights and per-token dynamic activations; not supported")
        dtypes.add(_TYPES[w["type"]])
    if len(dtypes) != 1:
        raise ConvertError(f"compressed-tensors source must have one W8A8 weight type, found {sorted(dtypes) or 'none'}")
    return dtypes.pop()


def glob_to_ct(pattern: str) -> str:
    """A converter --ignore pattern in compressed-tensors' own syntax ('re:' + regex for re.match)."""
    if pattern.startswith("re:"):
        return "re:.*" + pattern[3:] if not pattern[3:].startswith("^") else "re:" + pattern[4:]
    return "re:" + fnmatch.translate(pattern)


def export_config(dtype: str, ignore: list[str]) -> dict:
    """quantization_config for a dense W8A8 export (per-channel weights, per-token dynamic activations)."""
    typ = "int" if dtype == "int8" else "float"
    args = {"num_bits": 8, "type": typ, "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "observer_kwargs": {}}
    return {
        "quant_method": QUANT_METHOD,
        "format": "int-quantized" if typ == "int" else "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**args, "strategy": "channel", "dynamic": False, "observer": "minmax"},
            "input_activations": {**args, "strategy": "token", "dynamic": True, "observer": None},
            "output_activations": None,
        }},
        "ignore": ["lm_head"] + [glob_to_ct(p) for p in ignore],
        "kv_cache_scheme": None,
    }
