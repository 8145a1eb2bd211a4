"""Architecture adapters: which tensors of a checkpoint are converted, and their expected shapes.

Llama, Qwen2 and BitNet share the module layout model.layers.<i>.self_attn.{q,k,v,o}_proj and
model.layers.<i>.mlp.{gate,up,down}_proj; they differ in biases (Qwen2: q/k/v) and in how the
weights are quantized (BitNet: ternary absmean).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..format import TARGET_MODULES
from .errors import ConvertError

_PROJ = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class Arch:
    name: str              # the HF class name
    model_type: str
    qkv_bias: bool
    ternary: bool          # BitNet b1.58: weights are ternarized (absmean), not per-channel scaled


ARCHS = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", "llama", qkv_bias=False, ternary=False),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", "qwen2", qkv_bias=True, ternary=False),
    "BitNetForCausalLM": Arch("BitNetForCausalLM", "bitnet", qkv_bias=False, ternary=True),
}


def detect(config: dict) -> Arch:
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    what = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r} (no 'architectures')"
    raise ConvertError(f"unsupported architecture {what}: supported are {', '.join(ARCHS)}")


def _cfg_int(config: dict, key: str) -> int:
    v = config.get(key)
    if not isinstance(v, int) or v <= 0:
        raise ConvertError(f"config.json: {key!r} missing or not a positive integer (got {v!r})")
    return v


def expected_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """[N, K] of every projection the architecture has, by module name."""
    hidden = _cfg_int(config, "hidden_size")
    inter = _cfg_int(config, "intermediate_size")
    layers = _cfg_int(config, "num_hidden_layers")
    heads = _cfg_int(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kvd = heads * head_dim, kv * head_dim
    per = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kvd, hidden), "self_attn.v_proj": (kvd, hidden),
           "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
           "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{m}": s for i in range(layers) for m, s in per.items()}


def is_projection(module: str) -> bool:
    return bool(_PROJ.match(module)) and module.rsplit(".", 1)[1] in TARGET_MODULES


def layer_key(name: str) -> tuple:
    """Sort key that orders tensors by layer number, then name (model.layers.10 after .9)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
