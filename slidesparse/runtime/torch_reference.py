"""A pure-torch forward of a SlideSparse checkpoint, independent of vLLM: the tests' oracle.

The transformers class of the source architecture (LlamaForCausalLM, Qwen2ForCausalLM,
BitNetForCausalLM) is built from the checkpoint's config; every converted projection is replaced
by RefLinear, which runs kernels.reference.linear_ref (per-token activation quantization, the
exact dense equivalent of the lifted product, dequantization) on the pruned, quantized [N, K]
weight; everything else (embeddings, norms, lm_head) is loaded from the checkpoint unchanged.
Greedy decoding recomputes the whole sequence each step (no KV cache): slow, and obviously right.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn

from ..core.checkpoint import dense_weights
from ..core.format import SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, SlideSparseConfig
from ..kernels.reference import linear_ref

_SUFFIXES = (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)


class RefLinear(nn.Module):
    def __init__(self, w_q: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 act_dtype: str | None):
        super().__init__()
        self.w_q, self.scale, self.bias, self.act_dtype = w_q, scale, bias, act_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_ref(x, self.w_q, self.scale, self.bias, self.act_dtype)


def _tensors(ckpt: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


class TorchReference:
    """model = TorchReference(ckpt_dir); model.greedy([[1, 2, 3]], max_new_tokens=8).

    ckpt_dir: a SlideSparse checkpoint, or the dense W8A8 compressed-tensors one of the converter."""

    def __init__(self, ckpt: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        raw = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
        weights = list(dense_weights(ckpt))  # the core's decoding of what the converter wrote
        if raw.get("quant_method") == "compressed-tensors":
            # the dense W8A8 baseline the converter writes: same per-token activation scheme
            act = "int8" if weights[0][1].dtype == torch.int8 else "fp8_e4m3"
            drop = {f"{m}.{s}" for m, _, _ in weights for s in ("weight", "weight_scale")}
        else:
            act = SlideSparseConfig.from_dict(raw).activation_dtype
            drop = set()
        hf_cfg = AutoConfig.from_pretrained(ckpt)
        if hasattr(hf_cfg, "quantization_config"):
            del hf_cfg.quantization_config  # the HF model is built plain; the projections are ours
        hf_cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)  # tiny test models: init is cheap
        tensors = _tensors(ckpt)
        plain = {k: v.to(dtype) for k, v in tensors.items()
                 if k.rpartition(".")[2] not in _SUFFIXES and k not in drop}
        converted = set()
        for mod, w_q, scale in weights:
            bias = plain.pop(f"{mod}.bias", None)
            model.set_submodule(mod, RefLinear(w_q, scale, bias, act))
            converted.add(mod)
        missing, unexpected = model.load_state_dict(plain, strict=False)
        if unexpected:
            raise ValueError(f"reference model has no place for {unexpected[:3]}")
        if getattr(hf_cfg, "tie_word_embeddings", False):
            model.tie_weights()
            missing = [m for m in missing if not m.startswith("lm_head.")]
        if missing:  # a weight left at its random init would make the oracle meaningless
            raise ValueError(f"reference model left without weights: {missing[:3]}")
        self.model = model.eval()
        self.converted = converted

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        outs = []
        for p in prompts:
            ids = torch.tensor([p])
            new = []
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=ids).logits[0, -1]
                nxt = int(logits.argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            outs.append(new)
        return outs
