"""The SlideSparse checkpoint format (version 1): names, the quantization_config block, validation.

docs/format.md is the prose spec; this module is its single executable definition. A converted
linear layer `<prefix>` (say model.layers.0.self_attn.q_proj, an [N, K] weight) is stored as

    <prefix>.weight_packed   [N, K'/2]            fp8_e4m3 | int8 | bf16 | fp16   kept values
    <prefix>.weight_meta     [N, ceil(K'/8)]      uint8     2-bit positions, 2 windows per byte
    <prefix>.weight_scale    [N]                  float32   per-channel scale (quantized dtypes only)
    <prefix>.weight_shape    [2]                  int64     (N, K) of the unslid weight
    <prefix>.bias            [N]                  as in the source (Qwen2 q/k/v)

with K' = ceil(K / L) * 4 * (L/2 - 1) (2_inf: K' = 2 * ceil(K/2)). Everything else (embeddings,
norms, lm_head, ignored layers) is copied unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import SlideSparseError
from .pattern import Pattern, PatternError, parse_pattern
from .quant import QUANTIZED, QuantError, dtype_name

QUANT_METHOD = "slidesparse"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TUNING_FILE = "slidesparse_tuning.json"

SUFFIX_VALUES = "weight_packed"
SUFFIX_META = "weight_meta"
SUFFIX_SCALE = "weight_scale"
SUFFIX_SHAPE = "weight_shape"

WEIGHT_SCHEMES = ("per_channel_symmetric", "ternary_absmean", "none")
ACTIVATION_SCHEMES = ("per_token_dynamic", "none")


class FormatError(SlideSparseError):
    """A checkpoint whose SlideSparse metadata is missing, inconsistent or of another version."""


@dataclass(frozen=True)
class SlideSparseConfig:
    """The `quantization_config` block of a SlideSparse checkpoint's config.json."""

    sparsity: str                      # "2_8", ..., "2_inf"
    weight_dtype: str                  # fp8_e4m3 | int8 | bf16 | fp16
    weight_scheme: str                 # per_channel_symmetric | ternary_absmean | none
    activation_dtype: str | None       # fp8_e4m3 | int8 | None (unquantized)
    activation_scheme: str             # per_token_dynamic | none
    ignore: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    source: dict = field(default_factory=dict, compare=False)

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity)

    @property
    def quantized(self) -> bool:
        return self.weight_dtype in QUANTIZED

    def to_dict(self) -> dict:
        pat = self.pattern
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "sparsity": pat.name,
            "Z": pat.zeros,
            "L": pat.L if pat.L is not None else "inf",
            "packing": "2:4 values + 2-bit positions (see docs/format.md)",
            "weight_dtype": self.weight_dtype,
            "weight_scheme": self.weight_scheme,
            "activation_dtype": self.activation_dtype,
            "activation_scheme": self.activation_scheme,
            "ignore": list(self.ignore),
            "tuning_file": TUNING_FILE,
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SlideSparseConfig":
        if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"not a SlideSparse quantization_config (quant_method={d.get('quant_method')!r})"
                              if isinstance(d, dict) else "quantization_config is not an object")
        ver = d.get("format_version")
        if ver not in SUPPORTED_VERSIONS:
            raise FormatError(f"SlideSparse format version {ver!r} is not supported by this slidesparse "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade slidesparse or re-convert")
        try:
            pat = parse_pattern(d["sparsity"])
        except KeyError:
            raise FormatError("quantization_config has no 'sparsity'") from None
        except PatternError as e:
            raise FormatError(str(e)) from None
        L = d.get("L", pat.L if pat.L is not None else "inf")
        if str(L) != str(pat.L if pat.L is not None else "inf"):
            raise FormatError(f"quantization_config is inconsistent: sparsity {pat.name} but L={L}")
        try:
            wd = dtype_name(d["weight_dtype"])
            ad = d.get("activation_dtype")
            ad = dtype_name(ad) if ad else None
        except (KeyError, QuantError) as e:
            raise FormatError(f"quantization_config: {e}") from None
        ws, as_ = d.get("weight_scheme", "none"), d.get("activation_scheme", "none")
        if ws not in WEIGHT_SCHEMES or as_ not in ACTIVATION_SCHEMES:
            raise FormatError(f"quantization_config: unknown scheme weight={ws!r} activation={as_!r}")
        if (wd in QUANTIZED) != (ad is not None):
            raise FormatError(f"quantization_config: weight dtype {wd} needs activation dtype "
                              f"{'a quantized one' if wd in QUANTIZED else 'none'}, got {ad}")
        return cls(sparsity=pat.name, weight_dtype=wd, weight_scheme=ws, activation_dtype=ad,
                   activation_scheme=as_, ignore=tuple(d.get("ignore", ())), format_version=ver,
                   source=dict(d.get("source", {})))


def layer_shapes(n: int, k: int, cfg: SlideSparseConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every stored tensor of one converted [N, K] layer."""
    pat = cfg.pattern
    shapes = {SUFFIX_VALUES: (n, pat.kept_k(k)), SUFFIX_META: (n, pat.meta_bytes(k)), SUFFIX_SHAPE: (2,)}
    if cfg.quantized:
        shapes[SUFFIX_SCALE] = (n,)
    return shapes

