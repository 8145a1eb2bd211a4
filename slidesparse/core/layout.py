"""Model layout: which architectures and projections SlideSparse converts, which it leaves alone,
and the linear layers vLLM builds from them.

Llama, Qwen2 and BitNet share the module layout model.layers.<i>.self_attn.{q,k,v,o}_proj and
model.layers.<i>.mlp.{gate,up,down}_proj; they differ in biases (Qwen2: q/k/v) and in how the
weights are quantized (BitNet: ternary absmean).

vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj` (stacked along N) and,
under tensor parallelism of size T, splits the column-parallel layers (qkv, gate_up) along N and
the row-parallel ones (o, down) along K. KV heads are replicated when there are fewer than T of
them, one head per rank, as vLLM's QKVParallelLinear does. `vllm_layer_shapes` is that table: the
(N, K) of every linear layer on one rank, which is what the tuner measures and the runtime looks up.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .errors import SlideSparseError, shown

# projections SlideSparse converts, by block and module name in Llama / Qwen2 / BitNet checkpoints
BLOCKS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
TARGET_MODULES = BLOCKS["self_attn"] + BLOCKS["mlp"]
# vLLM's fused linear layers and the checkpoint projections they stack along N (in this order)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ROW_PARALLEL = ("o_proj", "down_proj")

# ASCII digits only (\d would take any Unicode digit), matched with fullmatch ($ allows a trailing newline)
_PROJ = re.compile(r"model\.layers\.([0-9]+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
_LAYER = re.compile(r"model\.layers\.([0-9]+)\.")

# Limits on config.json values, far above any real model (Llama 3.1 405B: 126 layers, hidden 16384,
# vocab 128256) and low enough that nothing sized from a hostile config.json can exhaust memory
# before the tensors that must match it are checked.
MAX_LAYERS = 4096
MAX_DIM = 1 << 24


class LayoutError(SlideSparseError):
    """A model config, module name or --ignore pattern that does not fit the supported layouts."""


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
    archs = config.get("architectures")
    if archs is None:
        archs = []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LayoutError(f"config.json: 'architectures' must be a list of class names, got {shown(archs)}")
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    what = (", ".join(map(shown, archs[:4])) + (", ..." if len(archs) > 4 else "") if archs
            else f"model_type {shown(config.get('model_type'))} (no 'architectures')")
    raise LayoutError(f"unsupported architecture {what}: supported are {', '.join(ARCHS)}")


def _cfg_int(config: dict, key: str, optional: bool = False) -> int | None:
    v = config.get(key)
    if v is None and optional:
        return None
    limit = MAX_LAYERS if key == "num_hidden_layers" else MAX_DIM
    # type(v) is int: JSON true/false arrive as bools, which isinstance(v, int) accepts
    if type(v) is not int or not 0 < v <= limit:
        raise LayoutError(f"config.json: {key!r} must be an integer in [1, {limit}], got {shown(v)}"
                          + ("" if optional or key in config else " (missing)"))
    return v


def head_dim(config: dict) -> int:
    hd = _cfg_int(config, "head_dim", optional=True)
    if hd is None:
        hd = _cfg_int(config, "hidden_size") // _cfg_int(config, "num_attention_heads")
        if hd == 0:
            raise LayoutError("config.json: num_attention_heads is larger than hidden_size (head_dim would be 0)")
    return hd


def _kv_heads(config: dict) -> int:
    heads = _cfg_int(config, "num_attention_heads")
    kv = _cfg_int(config, "num_key_value_heads", optional=True) or heads
    if heads % kv:
        raise LayoutError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return kv


def num_layers_in(names) -> int:
    """1 + the highest decoder-layer index among tensor names (0 if there are none)."""
    top = -1
    for n in names:
        m = _LAYER.match(n)
        if m and len(m.group(1)) <= 9:  # longer indices cannot match any config (MAX_LAYERS)
            top = max(top, int(m.group(1)))
    return top + 1


def check_config(config: dict, tensor_names=None) -> Arch:
    """The architecture, after checking every config.json value the layout reads (types and
    ranges); given the checkpoint's tensor names, also that num_hidden_layers does not promise
    layers the weights do not hold, before anything is sized from it."""
    arch = detect(config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        _cfg_int(config, key)
    _kv_heads(config)
    head_dim(config)
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise LayoutError(f"config.json: 'tie_word_embeddings' must be true or false, got {shown(tie)}")
    if tensor_names is not None:
        layers, present = config["num_hidden_layers"], num_layers_in(tensor_names)
        if layers > present:
            raise LayoutError(f"config.json says num_hidden_layers={layers}, but model.layers.{present} is missing "
                              f"(the weights hold {present} layer{'' if present == 1 else 's'})")
    return arch


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """[N, K] of every projection the architecture has, by checkpoint module name."""
    hidden = _cfg_int(config, "hidden_size")
    inter = _cfg_int(config, "intermediate_size")
    layers = _cfg_int(config, "num_hidden_layers")
    heads = _cfg_int(config, "num_attention_heads")
    kv = _kv_heads(config)
    hd = head_dim(config)
    q, kvd = heads * hd, kv * hd
    per = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kvd, hidden), "self_attn.v_proj": (kvd, hidden),
           "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
           "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{m}": s for i in range(layers) for m, s in per.items()}


def model_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a Hugging Face checkpoint of this architecture holds, in HF
    order: embeddings, per layer the norms, projections (Qwen2: q/k/v biases; BitNet: the two
    sub-norms), the final norm, and lm_head unless the embeddings are tied."""
    arch = detect(config)
    h, inter, v = _cfg_int(config, "hidden_size"), _cfg_int(config, "intermediate_size"), _cfg_int(config, "vocab_size")
    heads = _cfg_int(config, "num_attention_heads")
    kv = _kv_heads(config)
    hd = head_dim(config)
    bitnet = arch.ternary
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(_cfg_int(config, "num_hidden_layers")):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (heads * hd, h)),
                (p + "self_attn.k_proj.weight", (kv * hd, h)), (p + "self_attn.v_proj.weight", (kv * hd, h))]
        if arch.qkv_bias:
            out += [(p + "self_attn.q_proj.bias", (heads * hd,)), (p + "self_attn.k_proj.bias", (kv * hd,)),
                    (p + "self_attn.v_proj.bias", (kv * hd,))]
        out.append((p + "self_attn.o_proj.weight", (h, heads * hd)))
        if bitnet:
            out.append((p + "self_attn.attn_sub_norm.weight", (h,)))
        out += [(p + "post_attention_layernorm.weight", (h,)), (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)), (p + "mlp.down_proj.weight", (h, inter))]
        if bitnet:
            out.append((p + "mlp.ffn_sub_norm.weight", (inter,)))
    out.append(("model.norm.weight", (h,)))
    if config.get("tie_word_embeddings") is not True:
        out.append(("lm_head.weight", (v, h)))
    return out


def is_projection(module: str) -> bool:
    return bool(_PROJ.fullmatch(module))


def layer_key(name: str) -> tuple:
    """Sort key that orders tensors by layer number, then name (model.layers.10 after .9).

    Digit runs compare as (length, digits), which is numeric order without int(): a hostile name
    with thousands of digits would exceed Python's int-from-string limit."""
    return tuple((len(p), p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", name)))


# ----------------------------------------------------------------------------- --ignore

@dataclass(frozen=True)
class IgnoreRule:
    """Module names left unconverted: each pattern is a glob on the whole name (fnmatch) unless it
    starts with 're:' (a regular expression, re.search). Picklable: vLLM sends the quantization
    config, which holds one, to its engine and worker processes."""

    patterns: tuple[str, ...] = ()
    _compiled: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        compiled = []
        for p in self.patterns:
            if not isinstance(p, str):
                raise LayoutError(f"ignore pattern {p!r} is not a string")
            try:
                compiled.append((True, re.compile(p[3:])) if p.startswith("re:")
                                else (False, re.compile(fnmatch.translate(p))))
            except re.error as e:
                raise LayoutError(f"--ignore {p!r}: bad regular expression ({e})") from None
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def __call__(self, name: str) -> bool:
        return any(rx.search(name) if search else rx.match(name) for search, rx in self._compiled)


def check_fused_ignored(ignored: list[str]) -> None:
    """vLLM fuses q/k/v and gate/up into one linear layer, so they are ignored all or none."""
    ign = set(ignored)
    for m in ignored:
        prefix, leaf = m.rsplit(".", 1)
        for group in FUSED.values():
            if leaf in group:
                other = [f"{prefix}.{o}" for o in group if f"{prefix}.{o}" not in ign]
                if other:
                    raise LayoutError(f"--ignore matches {m} but not {other[0]}: vLLM fuses "
                                      f"{'/'.join(group)}, so ignore all of them or none")


# ----------------------------------------------------------------------------- vLLM's layers

def vllm_layer_name(module: str) -> str:
    """Checkpoint projection -> the vLLM layer that holds it (q_proj -> qkv_proj, down_proj -> itself)."""
    parent, _, proj = module.rpartition(".")
    for fused, parts in FUSED.items():
        if proj in parts:
            return f"{parent}.{fused}" if parent else fused
    return module


def rank_rows(proj: str, n_full: int, tp: int, rank: int, head_size: int) -> tuple[int, int]:
    """(first row, rows) of a projection's N that tensor-parallel `rank` of `tp` holds.

    Row-parallel projections (o, down) keep every row. k/v with fewer heads than ranks keep one
    head per rank, head rank // (tp / heads), as vLLM replicates them."""
    if proj in ROW_PARALLEL or tp == 1:
        return 0, n_full
    if proj in ("k_proj", "v_proj"):
        heads = n_full // head_size
        if heads < tp:
            if tp % heads:
                raise LayoutError(f"{heads} KV heads cannot be replicated evenly over {tp} ranks")
            return (rank // (tp // heads)) * head_size, head_size
    if n_full % tp:
        raise LayoutError(f"{proj}: N={n_full} does not split over {tp} ranks")
    rows = n_full // tp
    return rank * rows, rows


def rank_k(proj: str, k_full: int, tp: int) -> int:
    """K of a projection on one rank: row-parallel layers split K, the others keep it."""
    if proj not in ROW_PARALLEL or tp == 1:
        return k_full
    if k_full % tp:
        raise LayoutError(f"{proj}: K={k_full} does not split over {tp} ranks")
    return k_full // tp


def vllm_layer_shapes(projections: dict[str, tuple[int, int]], config: dict,
                      tp: int = 1) -> dict[str, tuple[int, int]]:
    """{vLLM layer name: (N, K) on one of `tp` ranks} from the checkpoint's per-projection (N, K)."""
    hd = head_dim(config)
    out: dict[str, list[int]] = {}
    for module in sorted(projections, key=layer_key):
        n, k = projections[module]
        proj = module.rpartition(".")[2]
        _, rows = rank_rows(proj, n, tp, 0, hd)
        k_local = rank_k(proj, k, tp)
        acc = out.setdefault(vllm_layer_name(module), [0, k_local])
        if acc[1] != k_local:
            raise LayoutError(f"{vllm_layer_name(module)}: fused projections disagree on K ({acc[1]} vs {k_local})")
        acc[0] += rows
    return {name: (n, k) for name, (n, k) in out.items()}
