"""`slidesparse verify`: every stored layer is exactly what the format and the source say.

Checks per converted layer (SlideSparse checkpoints):
  * tensor shapes and dtypes match format.layer_shapes for the stored (N, K);
  * the metadata is valid (ascending 2-bit positions) and the slid weight is 2:4;
  * it unslides to a Z_L weight whose canonical slid + packed form is exactly what is stored;
  * with a source: the weight and scale equal the converter's pruned + quantized source
    (pipeline.quantize_module) bit for bit, and every copied tensor equals its source.
The first failure raises VerifyError naming the layer.
"""

from __future__ import annotations

import torch

from ..core.checkpoint import Checkpoint, checkpoint_kind, converted_modules, load_layer
from ..core.pattern import PatternError, as_bits, check_groups, is_2to4, no_negative_zero, parse_pattern
from ..core.quant import dtype_name
from .errors import ConvertError
from .fastpack import slide_pack
from .pipeline import open_source, quantize_module


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
    if kind == "compressed-tensors":
        # a dense export of ours says how it was made; any other compressed-tensors checkpoint is dense
        export = ckpt.config.get("slidesparse_export") or {}
        spec = export.get("sparsity", "none")
        pat = None if spec == "none" else parse_pattern(spec)
        ignore = tuple(export.get("ignore", ()))
    src = open_source(source, ignore=ignore) if source is not None else None
    modules = converted_modules(ckpt)
    if not modules:
        raise VerifyError(f"{path}: no converted layers found")
    from tqdm import tqdm

    for m in tqdm(modules, desc="verify", disable=not progress, dynamic_ncols=True):
        try:
            d = load_layer(ckpt, m)
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
        except PatternError as e:
            raise VerifyError(f"{m}: {e}") from None
        if src is not None:
            _check_against_source(src, m, d, pat, cfg, kind, ckpt)
    if src is not None:
        converted = set(modules)
        for name, info in ckpt.tensors.items():
            mod = name.rsplit(".", 1)[0]
            if mod in converted and not name.endswith(".bias"):
                continue
            if name not in src.ckpt.tensors:
                raise VerifyError(f"{name}: not in the source checkpoint")
            a, b = ckpt.get(name), src.ckpt.get(name)
            # copied means byte for byte (no -0.0 normalisation), compared without extra copies
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                raise VerifyError(f"{name}: differs from the source (copied tensors must be identical)")
        missing = set(src.modules) - converted
        if missing:
            raise VerifyError(f"{sorted(missing)[0]}: converted in the source's plan but absent here")
    return {"path": str(path), "layers": len(modules), "kind": kind, "against_source": src is not None}


def _check_against_source(src, m, d, pat, cfg, kind, ckpt) -> None:
    if m not in src.shapes:
        raise VerifyError(f"{m}: not a projection of the source model")
    w = src.ckpt.get(m + ".weight")
    ct_scale = src.ckpt.get(m + ".weight_scale") if src.ct_dtype else None
    dtype = cfg.weight_dtype if cfg else dtype_name(
        "int8" if d["weight"].dtype == torch.int8 else "fp8_e4m3")
    q, scale = quantize_module(w, pat, dtype, src.arch, ct_scale)
    if not _bits_equal(q, d["weight"]):
        diff = (q.float() != d["weight"].float()).nonzero()
        where = f" (first at row {diff[0, 0].item()}, column {diff[0, 1].item()})" if len(diff) else ""
        raise VerifyError(f"{m}: weight differs from the pruned and quantized source{where}")
    if (scale is None) != (d["scale"] is None) or (scale is not None and not torch.equal(scale, d["scale"])):
        raise VerifyError(f"{m}: weight_scale differs from the source's")
