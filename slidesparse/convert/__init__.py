"""Checkpoint conversion: Hugging Face models -> SlideSparse-Z_L (or dense W8A8) checkpoints.

    convert(src, dst, sparsity="2_8", dtype="fp8", ...)   the converter (pipeline.py)
    make_model(preset, out, ...)                          random-weight models with real shapes
    inspect_checkpoint(ckpt), verify(ckpt, source=None)  per-layer table; exact validation

Reading converted checkpoints back is the core's (slidesparse.core.checkpoint).
"""

from .errors import ConvertError
from .make_model import make_model
from .pipeline import convert, quantize_module

__all__ = ["ConvertError", "convert", "quantize_module", "make_model"]
