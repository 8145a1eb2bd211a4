"""Put this folder on PYTHONPATH (with ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2) and a
Python process and its children see an x86-64 CPU without AVX-512, VNNI or AMX: vLLM then loads
its _C_AVX2 kernels and picks oneDNN for INT8 GEMMs (vllm/platforms/cpu.py and its kernel choices
ask torch.cpu), oneDNN runs its AVX2 code, and torch dispatches its own AVX2 kernels. Used by
tests/test_vllm.py to run the vLLM-vs-reference checks as on an AVX2-only machine (AMD EPYC Zen
2/3, Intel before Ice Lake) on whatever CPU the suite runs on."""

import torch.cpu

for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    if hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, lambda: False)
