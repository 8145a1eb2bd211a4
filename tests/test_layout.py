"""Model layout (core/layout.py): projections, the ignore rule, vLLM's fused per-rank shapes."""

from __future__ import annotations

import pickle

import pytest

from slidesparse.core.layout import (IgnoreRule, LayoutError, check_fused_ignored, model_tensors,
                                     projection_shapes, rank_rows, vllm_layer_name, vllm_layer_shapes)
from slidesparse.core.presets import PRESETS

LLAMA_1B = {"num_attention_heads": 32, "hidden_size": 2048, "head_dim": 64}


def _llama_1b_projections(layers=2):
    proj = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        proj.update({p + "self_attn.q_proj": (2048, 2048), p + "self_attn.k_proj": (512, 2048),
                     p + "self_attn.v_proj": (512, 2048), p + "self_attn.o_proj": (2048, 2048),
                     p + "mlp.gate_proj": (8192, 2048), p + "mlp.up_proj": (8192, 2048),
                     p + "mlp.down_proj": (2048, 8192)})
    return proj


def test_vllm_layer_shapes_follow_fusion_and_tp():
    proj = _llama_1b_projections()
    tp1 = vllm_layer_shapes(proj, LLAMA_1B)
    assert tp1["model.layers.1.self_attn.qkv_proj"] == (3072, 2048)
    assert sorted(set(tp1.values())) == [(2048, 2048), (2048, 8192), (3072, 2048), (16384, 2048)]
    tp2 = vllm_layer_shapes(proj, LLAMA_1B, tp=2)
    assert sorted(set(tp2.values())) == [(1536, 2048), (2048, 1024), (2048, 4096), (8192, 2048)]
    # 8 KV heads over 16 ranks: each rank keeps one replicated head of 64 rows for k and for v
    assert vllm_layer_shapes(proj, LLAMA_1B, tp=16)["model.layers.0.self_attn.qkv_proj"] == (128 + 64 + 64, 2048)
    with pytest.raises(LayoutError, match="does not split over 3 ranks"):
        vllm_layer_shapes(proj, LLAMA_1B, tp=3)


def test_rank_rows_replicates_kv_heads_like_vllm():
    # 2 KV heads of 8 rows over 4 ranks: ranks 0,1 keep head 0, ranks 2,3 head 1
    assert [rank_rows("k_proj", 16, 4, r, 8) for r in range(4)] == [(0, 8), (0, 8), (8, 8), (8, 8)]
    assert [rank_rows("q_proj", 32, 4, r, 8) for r in range(4)] == [(0, 8), (8, 8), (16, 8), (24, 8)]
    assert rank_rows("down_proj", 48, 4, 3, 8) == (0, 48)
    assert vllm_layer_name("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up_proj"
    assert vllm_layer_name("model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"


def test_projection_shapes_and_model_tensors_agree_with_the_presets():
    cfg = PRESETS["qwen2.5-7b"]
    proj = projection_shapes(cfg)
    assert len(proj) == 7 * 28 and proj["model.layers.27.mlp.down_proj"] == (3584, 18944)
    tensors = dict(model_tensors(cfg))
    assert all(tensors[m + ".weight"] == nk for m, nk in proj.items())
    assert tensors["model.layers.0.self_attn.k_proj.bias"] == (512,) and "lm_head.weight" in tensors
    bitnet = dict(model_tensors(PRESETS["bitnet-b1.58-2b"]))
    assert "model.layers.0.mlp.ffn_sub_norm.weight" in bitnet and "lm_head.weight" not in bitnet  # tied


def test_ignore_rule_globs_regexes_and_pickles():
    rule = IgnoreRule(("model.layers.0.*", "re:mlp\\.down"))
    assert rule("model.layers.0.self_attn.q_proj") and not rule("model.layers.10.self_attn.q_proj")
    assert rule("model.layers.5.mlp.down_proj") and not rule("model.layers.5.mlp.up_proj")
    again = pickle.loads(pickle.dumps(rule))
    assert again("model.layers.5.mlp.down_proj") and again == rule
    with pytest.raises(LayoutError, match="bad regular expression"):
        IgnoreRule(("re:(",))
    check_fused_ignored(["m.gate_proj", "m.up_proj"])
    with pytest.raises(LayoutError, match="ignore all of them or none"):
        check_fused_ignored(["m.q_proj"])
