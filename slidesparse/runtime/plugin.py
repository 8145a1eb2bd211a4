"""vLLM plugin entry point (pyproject: vllm.general_plugins, slidesparse = ...:register).

vLLM calls register() in every process it starts (front end, engine core, workers), possibly more
than once; it must be idempotent and must not initialise CUDA (workers pick their device later).
It registers:
  - the quantization config "slidesparse" (selected by the checkpoint's quant_method; vLLM's
    register_quantization_config also adds it to the platform's supported_quantization list);
  - the custom ops slidesparse::* (torch.library, with fake implementations);
  - a BitNet b1.58 model class, unless the installed vLLM has one.
"""

from __future__ import annotations

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from ..core.format import QUANT_METHOD
    from ..kernels import reference, sparse_linear  # noqa: F401  (define torch.ops.slidesparse.*)
    from .config import SlideSparseQuantConfig

    if QUANT_METHOD not in QUANTIZATION_METHODS or _registered_cls(QUANT_METHOD) is not SlideSparseQuantConfig:
        register_quantization_config(QUANT_METHOD)(SlideSparseQuantConfig)
    if "BitNetForCausalLM" not in ModelRegistry.get_supported_archs():
        # a "module:Class" string: vLLM imports the model only when a BitNet checkpoint is served
        ModelRegistry.register_model("BitNetForCausalLM", "slidesparse.runtime.bitnet:BitNetForCausalLM")
    _DONE = True


def _registered_cls(name: str):
    from vllm.model_executor.layers.quantization import get_quantization_config
    try:
        return get_quantization_config(name)
    except ValueError:
        return None
