"""Model presets for the kernel benchmark: the four linear shapes (N, K) of one decoder layer,
derived from the configs that `slidesparse make-model` writes (slidesparse.convert.make_model).

qkv and gate_up are the fused projections vLLM runs (q|k|v and gate|up stacked along N).
"""

from __future__ import annotations

DEFAULT_PRESETS = ("llama3.2-1b", "qwen2.5-7b")


class PresetError(ValueError):
    pass


def presets() -> tuple[str, ...]:
    from ..convert.make_model import PRESETS
    return tuple(PRESETS)


def linear_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """{'qkv': (N, K), 'o': ..., 'gate_up': ..., 'down': ...} for one preset."""
    from ..convert.make_model import PRESETS
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    c = PRESETS[preset]
    h, i, nh, nkv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // nh
    return {"qkv": ((nh + 2 * nkv) * hd, h), "o": (h, nh * hd), "gate_up": (2 * i, h), "down": (h, i)}
