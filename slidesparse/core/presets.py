"""Model presets: the config.json of real models' shapes (Llama 3.2 1B/3B, Qwen2.5 7B/14B, BitNet
b1.58 2B) and of tiny test models, for `slidesparse make-model` and the benchmarks' shapes.

Tiny shapes: tiny-llama and tiny-qwen2 have every K a multiple of 4, 6, 8, 12, 16 (tiny-qwen2 of
10 too); tiny-bitnet's K (128, 320) are not multiples of 6, so 2_6 and 2_12 exercise padding.
"""

from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama(hidden, inter, layers, heads, kv, vocab, head_dim=None, tie=True, rope_scaling=None,
           max_pos=131072):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim or hidden // heads, "vocab_size": vocab,
            "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": rope_scaling, "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
            "tie_word_embeddings": tie, "use_cache": True}


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie=False, eps=1e-6, max_pos=32768):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "hidden_act": "silu",
            "max_position_embeddings": max_pos, "rms_norm_eps": eps, "rope_theta": 1000000.0,
            "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": layers, "attention_dropout": 0.0, "initializer_range": 0.02,
            "tie_word_embeddings": tie, "use_cache": True}


def _bitnet(hidden, inter, layers, heads, kv, vocab, tie=True, max_pos=4096):
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": vocab, "hidden_act": "relu2",
            "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "tie_word_embeddings": tie, "use_cache": True}


PRESETS: dict[str, dict] = {
    "llama3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, head_dim=64, rope_scaling=_LLAMA3_ROPE),
    "llama3.2-3b": _llama(3072, 8192, 28, 24, 8, 128256, head_dim=128, rope_scaling=_LLAMA3_ROPE),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064),
    "qwen2.5-14b": _qwen2(5120, 13824, 48, 40, 8, 152064, eps=1e-5),
    "bitnet-b1.58-2b": _bitnet(2560, 6912, 30, 20, 5, 128256),
    "tiny-llama": _llama(96, 288, 2, 3, 1, 512, head_dim=32, max_pos=4096),
    "tiny-qwen2": _qwen2(240, 480, 2, 3, 1, 1024, max_pos=4096),
    "tiny-bitnet": _bitnet(128, 320, 2, 4, 2, 512),
}
