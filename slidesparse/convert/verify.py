"""`slidesparse verify`: every stored layer is exactly what the format and the source say.

Checks the checkpoint as a whole: every tensor its architecture needs (core.layout.model_tensors,
with each converted projection's .weight replaced by the tensors of format.layer_shapes, or by
.weight + .weight_scale in a compressed-tensors export) is present with its shape and dtype, and
nothing else is; every float value is finite and every scale finite and positive.
Checks per converted layer (SlideSparse checkpoints):
  * tensor shapes and dtypes match format.layer_shapes for the (N, K) of the architecture;
  * the metadata is valid (ascending 2-bit positions) and the slid weight is 2:4;
  * it unslides to a Z_L weight whose canonical slid + packed form is exactly what is stored;
  * with a source: the weight and scale equal the converter's pruned + quantized source
    (pipeline.quantize_module) bit for bit, and every copied tensor equals its source.
The first failure raises VerifyError naming the layer.
"""

from __future__ import annotations

import torch

from ..core.checkpoint import Checkpoint, CheckpointError, checkpoint_kind, first_nonfinite, load_layer
from ..core.errors import shown
from ..core.format import SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, layer_shapes
from ..core.layout import IgnoreRule, LayoutError, check_config, check_fused_ignored, is_projection, model_tensors
from ..core.pattern import PatternError, as_bits, check_groups, is_2to4, no_negative_zero, parse_pattern
from ..core.quant import DTYPES, dtype_name
from .errors import ConvertError
from .fastpack import slide_pack
from .pipeline import open_source, quantize_module, read_finite, read_scale

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
CODES = (torch.int8, torch.float8_e4m3fn)


class VerifyError(ConvertError):
    """A converted checkpoint that fails verification (the message names the layer)."""


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(as_bits(no_negative_zero(a)), as_bits(no_negative_zero(b)))


def verify(path, source=None, progress: bool = False) -> dict:
    """Verify the converted checkpoint at `path` (and against `source` if given); returns a summary."""
    ckpt = Checkpoint(path)
    ckpt.check_index()
    kind, cfg = checkpoint_kind(ckpt)
    pat, ignore = (cfg.pattern, cfg.ignore) if cfg else (None, ())
    export = None
    if kind == "compressed-tensors":
        # a dense export of ours says how it was made; any other compressed-tensors checkpoint is dense
        export = ckpt.config.get("slidesparse_export")
        if export is not None and not isinstance(export, dict):
            raise CheckpointError(f"{path}: slidesparse_export is not a JSON object")
        spec, ignore = (export or {}).get("sparsity", "none"), (export or {}).get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise CheckpointError(f"{path}: slidesparse_export.ignore must be a list of patterns, got {shown(ignore)}")
        try:
            pat = None if spec == "none" else parse_pattern(spec)
        except PatternError as e:
            raise CheckpointError(f"{path}: slidesparse_export: {e}") from None
        ignore = tuple(ignore)
    arch = check_config(ckpt.config)
    method = pruning_method(cfg.source if cfg else export)
    modules, layer_nk = _check_complete(ckpt, kind, cfg, ignore, export is not None)
    if not modules:
        raise VerifyError(f"{path}: no converted layers found")
    src = open_source(source, ignore=ignore) if source is not None else None
    if src is not None and (src.arch != arch or dict(model_tensors(src.ckpt.config)) != dict(model_tensors(ckpt.config))):
        raise VerifyError(f"{path}: the source {source} is a {src.arch.name} of other shapes than this "
                          f"{arch.name} checkpoint; it is not the model this was converted from")
    from tqdm import tqdm

    for m in tqdm(modules, desc="verify", disable=not progress, dynamic_ncols=True):
        try:
            d = load_layer(ckpt, m)
            if d["shape"] != layer_nk[m]:
                raise VerifyError(f"{m}: stored shape {list(d['shape'])}, but config.json implies {list(layer_nk[m])}")
            for what, t in (("weight", d["weight"]), ("weight_scale", d["scale"]), ("bias", d["bias"])):
                bad = first_nonfinite(t) if t is not None else None
                if bad is not None:
                    raise VerifyError(f"{m}: {what} holds {t[bad].float().item()} at {list(bad)}; values must be finite")
            if d["scale"] is not None and not bool((d["scale"] > 0).all()):
                raise VerifyError(f"{m}: weight_scale holds {d['scale'].min().item()}; scales must be positive")
            if kind == "slidesparse":
                slid, w = d["slid"], d["weight"]
                if not is_2to4(slid):
                    raise VerifyError(f"{m}: slid weight is not 2:4")
                check_groups(w, pat, name=m)
                # the one canonical slid + packed form of w (slide_pack is tested bit-identical to
                # pattern.pack(pattern.slide(w)), and much faster on big layers)
                values, meta = slide_pack(w, pat)
                if not (_bits_equal(values, ckpt.get(f"{m}.weight_packed")) and torch.equal(meta, ckpt.get(f"{m}.weight_meta"))):
                    raise VerifyError(f"{m}: packed values/metadata are not the canonical slid form of the "
                                      "weight they unpack to (wrong window assignment, explicit zeros at "
                                      "non-lowest free positions, or a corrupt value)")
            elif pat is not None:
                check_groups(d["weight"], pat, name=m)
        except (PatternError, CheckpointError) as e:
            raise VerifyError(f"{m}: {e}") from None
        if src is not None:
            _check_against_source(src, m, d, pat, cfg, kind, ckpt, method)
    converted = set(modules)
    for name, info in ckpt.tensors.items():
        mod = name.rsplit(".", 1)[0]
        if mod in converted and not name.endswith(".bias"):
            continue
        a = ckpt.get(name)
        bad = first_nonfinite(a)
        if bad is not None:
            raise VerifyError(f"{name}: holds {a[bad].float().item()} at {list(bad)}; values must be finite")
        if src is None:
            continue
        if name not in src.ckpt.tensors:
            raise VerifyError(f"{name}: not in the source checkpoint")
        b = src.ckpt.get(name)
        # copied means byte for byte (no -0.0 normalisation), compared without extra copies
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            raise VerifyError(f"{name}: differs from the source (copied tensors must be identical)")
    if src is not None:
        missing = set(src.modules) - converted
        if missing:
            raise VerifyError(f"{sorted(missing)[0]}: converted in the source's plan but absent here")
    return {"path": str(path), "layers": len(modules), "tensors": len(ckpt.tensors), "kind": kind,
            "against_source": src is not None, "values": VALUES_CHECKED[method] if src is not None else None}


def _check_complete(ckpt, kind, cfg, ignore, ours: bool) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Every tensor the architecture needs, with its shape and dtype, and nothing else. Returns the
    converted projections in layer order and the (N, K) config.json gives each."""
    arch_name = check_config(ckpt.config).name
    ignored = IgnoreRule(tuple(ignore))
    want: dict[str, tuple[tuple, tuple]] = {}  # name -> (allowed shapes, allowed dtypes)
    modules, nk, dense_proj = [], {}, []
    for name, shape in model_tensors(ckpt.config):
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod is None or not is_projection(mod):
            want[name] = ((shape,), FLOATS)
            continue
        n, k = shape
        if kind == "slidesparse":
            converted = not ignored(mod)
        else:  # ours: per its --ignore; another tool's export: whichever projections carry a scale
            converted = not ignored(mod) if ours else f"{mod}.weight_scale" in ckpt.tensors
        if not converted:
            want[name] = ((shape,), FLOATS)
            dense_proj.append(mod)
            continue
        modules.append(mod)
        nk[mod] = (n, k)
        if kind == "slidesparse":
            dtypes = {SUFFIX_VALUES: (DTYPES[cfg.weight_dtype],), SUFFIX_META: (torch.uint8,),
                      SUFFIX_SCALE: (torch.float32,), SUFFIX_SHAPE: (torch.int64,)}
            for suffix, sh in layer_shapes(n, k, cfg).items():
                want[f"{mod}.{suffix}"] = ((sh,), dtypes[suffix])
        else:
            want[name] = ((shape,), CODES)
            want[f"{mod}.weight_scale"] = (((n, 1), (n,)), FLOATS)
    try:
        check_fused_ignored(dense_proj)
    except LayoutError as e:
        raise VerifyError(str(e).replace("--ignore matches", "the checkpoint leaves")) from None
    have = ckpt.tensors
    for name, (shapes, dtypes) in want.items():
        info = have.get(name)
        if info is None:
            raise VerifyError(f"{name}: missing (a {arch_name} with this config.json needs it)")
        if info.shape not in shapes:
            raise VerifyError(f"{name}: has shape {list(info.shape)}, but config.json implies {list(shapes[0])}")
        if info.dtype not in dtypes:
            raise VerifyError(f"{name}: is {str(info.dtype).removeprefix('torch.')}, expected "
                              f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    extra = sorted(n for n in have if n not in want)
    if extra:
        raise VerifyError(f"{shown(extra[0])}: unexpected tensor (not part of a {arch_name} with this config.json"
                          f"{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")
    return modules, nk


# what `verify --source` can say about the projections' values, by pruning method: calibrated
# pruning cannot be rerun bit for bit here (its float sums depend on the CPU and thread count)
VALUES_CHECKED = {"magnitude": "exact",
                  "wanda": "exact on the stored mask (the source's values, quantized; the mask is not recomputed)",
                  "sparsegpt": "not checked (sparsegpt updates weights; only shapes, the Z_L pattern, scales of "
                               "ternary and compressed-tensors sources, and the copied tensors are)"}


def pruning_method(record) -> str:
    """The pruning method a converted checkpoint records (quantization_config.source.pruning or
    slidesparse_export.pruning): magnitude unless a calibrated pruner's record says otherwise."""
    pruning = (record or {}).get("pruning") if isinstance(record, dict) else None
    method = pruning.get("method") if isinstance(pruning, dict) else "magnitude"
    if method not in VALUES_CHECKED:
        raise CheckpointError(f"unknown pruning method {method!r} in the checkpoint's config")
    return method


def _check_against_source(src, m, d, pat, cfg, kind, ckpt, method="magnitude") -> None:
    if m not in src.shapes:
        raise VerifyError(f"{m}: not a projection of the source model")
    w = read_finite(src.ckpt, m + ".weight")
    ct_scale = read_scale(src.ckpt, m + ".weight_scale") if src.ct_dtype else None
    dtype = cfg.weight_dtype if cfg else dtype_name(
        "int8" if d["weight"].dtype == torch.int8 else "fp8_e4m3")
    if method == "magnitude":
        q, scale = quantize_module(w, pat, dtype, src.arch, ct_scale)
    else:
        from .calibrate import source_on_mask
        q, scale = source_on_mask(w, d["weight"].float() != 0, dtype, src.arch, ct_scale)
    if method == "sparsegpt":  # the values moved; a ternary or compressed-tensors grid's scale did not
        if src.arch.ternary or src.ct_dtype:
            if not torch.equal(scale, d["scale"]):
                raise VerifyError(f"{m}: weight_scale differs from the source's")
        return
    if not _bits_equal(q, d["weight"]):
        diff = (q.float() != d["weight"].float()).nonzero()
        where = f" (first at row {diff[0, 0].item()}, column {diff[0, 1].item()})" if len(diff) else ""
        raise VerifyError(f"{m}: weight differs from the pruned and quantized source{where}")
    if (scale is None) != (d["scale"] is None) or (scale is not None and not torch.equal(scale, d["scale"])):
        raise VerifyError(f"{m}: weight_scale differs from the source's")
