"""Checkpoint conversion: Hugging Face models -> SlideSparse-Z_L (or dense W8A8) checkpoints.

    convert(src, dst, sparsity="2_8", dtype="fp8", ...)   the converter (pipeline.py)
    load_layer(ckpt, prefix), dense_weights(ckpt)        read converted weights back (load.py)
    make_model(preset, out, ...)                          random-weight models with real shapes
    inspect_checkpoint(ckpt), verify(ckpt, source=None)  per-layer table; exact validation
"""

from .errors import ConvertError
from .load import converted_modules, dense_weights, load_layer
from .make_model import make_model
from .pipeline import convert, quantize_module

__all__ = ["ConvertError", "convert", "quantize_module", "load_layer", "dense_weights", "converted_modules",
           "make_model"]

