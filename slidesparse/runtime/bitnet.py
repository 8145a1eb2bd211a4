"""BitNet b1.58 for vLLM (registered by the plugin when vLLM has no BitNet of its own).

The architecture of transformers' BitNetForCausalLM: Llama with two extra RMSNorms,
attn_sub_norm on the attention output before o_proj and ffn_sub_norm on relu(gate)^2 * up before
down_proj. The ternary weights and per-token activation quantization are the SlideSparse linear
layers' business (quantization_config), so this file is only the float skeleton.

Under tensor parallelism both sub-norms see a slice of their vector (heads, or intermediate
columns); ShardedRMSNorm all-reduces the sum of squares so the result is that of the full norm.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split evenly across tensor-parallel ranks (HF math: float32 variance)."""

    def __init__(self, full_size: int, eps: float):
        super().__init__()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.full_size, self.eps = full_size, eps
        self.weight = nn.Parameter(torch.ones(full_size // self.tp_size), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = param.shape[0]
        param.data.copy_(loaded[self.tp_rank * n:(self.tp_rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        ss = x32.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            ss = tensor_model_parallel_all_reduce(ss)
        x32 = x32 * torch.rsqrt(ss / self.full_size + self.eps)
        return self.weight * x32.to(dtype)


class BitNetAttention(LlamaAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = kwargs["config"]
        self.attn_sub_norm = ShardedRMSNorm(self.total_num_heads * self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        out, _ = self.o_proj(self.attn_sub_norm(out))
        return out


class BitNetMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, eps: float, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.ffn_sub_norm = ShardedRMSNorm(intermediate_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        h = torch.relu(gate).square() * up
        out, _ = self.down_proj(self.ffn_sub_norm(h))
        return out


class BitNetDecoderLayer(nn.Module):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        if getattr(config, "hidden_act", "relu2") != "relu2":
            raise ValueError(f"BitNet expects hidden_act 'relu2', got {config.hidden_act!r}")
        bias = getattr(config, "attention_bias", False)
        self.self_attn = BitNetAttention(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            quant_config=quant_config, bias=bias, bias_o_proj=bias, cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.self_attn")
        self.mlp = BitNetMLP(config.hidden_size, config.intermediate_size, config.rms_norm_eps,
                             quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class BitNetForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=BitNetDecoderLayer)
