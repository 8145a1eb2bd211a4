"""The vLLM plugin entry point (runtime/plugin.py)."""

from __future__ import annotations


def test_plugin_register_is_idempotent_and_initialises_no_cuda():
    code = (
        "import torch\n"
        "from slidesparse.runtime.plugin import register\n"
        "register(); register()\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "from vllm import ModelRegistry\n"
        "from slidesparse.runtime.config import SlideSparseQuantConfig\n"
        "assert QUANTIZATION_METHODS.count('slidesparse') == 1\n"
        "assert get_quantization_config('slidesparse') is SlideSparseQuantConfig\n"
        "assert 'BitNetForCausalLM' in ModelRegistry.get_supported_archs()\n"
        "assert hasattr(torch.ops.slidesparse, 'reference_linear')\n"
        "assert not torch.cuda.is_initialized()\n"
        "from importlib.metadata import entry_points\n"
        "ep = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'slidesparse']\n"
        "assert ep and ep[0].load() is register\n"
        "print('ok')\n")
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
