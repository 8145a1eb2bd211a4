"""Model presets for the kernel benchmark: the four linear layers (N, K) of one decoder layer as
vLLM builds them (core.layout.vllm_layer_shapes), from the presets' configs (core.presets)."""

from __future__ import annotations

from ..core.errors import SlideSparseError
from ..core.layout import projection_shapes, vllm_layer_shapes
from ..core.presets import PRESETS

SHORT = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}


class PresetError(SlideSparseError):
    pass


def presets() -> tuple[str, ...]:
    return tuple(PRESETS)


def linear_shapes(preset: str, tp: int = 1) -> dict[str, tuple[int, int]]:
    """{'qkv': (N, K), 'o': ..., 'gate_up': ..., 'down': ...} of layer 0 of one preset on one of `tp` ranks."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = {**PRESETS[preset], "num_hidden_layers": 1}
    shapes = vllm_layer_shapes(projection_shapes(cfg), cfg, tp)
    return {SHORT[name.rpartition(".")[2]]: nk for name, nk in shapes.items()}
