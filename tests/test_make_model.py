"""make-model: configs and tokenizers that transformers accepts, real shapes, seeded weights."""

import json
import math

import pytest
import torch

from slidesparse.convert import make_model
from slidesparse.convert.make_model import tensor_plan
from slidesparse.core.presets import PRESETS

from helpers import bits, read_all


# published parameter counts of the real models
@pytest.mark.parametrize("preset,params", [("llama3.2-1b", 1.2358e9), ("llama3.2-3b", 3.2128e9),
                                           ("qwen2.5-7b", 7.6156e9), ("qwen2.5-14b", 14.770e9)])
def test_big_presets_have_the_real_shapes(preset, params):
    n = sum(math.prod(s) for _, s, _ in tensor_plan(PRESETS[preset]))
    assert abs(n - params) / params < 0.002


def test_tiny_presets_k_divisibility():
    def ks(c):
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return {c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * hd}
    for p in ("tiny-llama", "tiny-qwen2"):
        assert all(k % L == 0 for k in ks(PRESETS[p]) for L in (4, 6, 8, 12, 16)), p
    assert all(k % 6 for k in ks(PRESETS["tiny-bitnet"]))  # padding gets exercised


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-bitnet"])
def test_transformers_loads_tiny_models(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / preset
    make_model(preset, d, seed=3)
    cfg = json.loads((d / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert len(tok) == cfg["vocab_size"]
    assert tok.eos_token_id == cfg["eos_token_id"] == cfg["vocab_size"] - 1
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == cfg["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert 5 < float(logits.std()) < 12  # peaked, as the runtime's greedy comparisons need


def test_seeded_and_dtype(tmp_path):
    make_model("tiny-llama", tmp_path / "a", seed=4)
    make_model("tiny-llama", tmp_path / "b", seed=4)
    make_model("tiny-llama", tmp_path / "c", seed=5)
    make_model("tiny-llama", tmp_path / "d", seed=4, dtype="fp32")
    a, b, c, d = (read_all(tmp_path / x) for x in "abcd")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(bits(a[name]), bits(b[name])) and not torch.equal(a[name], c[name])
    assert d[name].dtype == torch.float32 and a[name].dtype == torch.bfloat16
    assert torch.equal(d[name].to(torch.bfloat16), a[name])  # same draws, rounded
    assert abs(float(a[name].float().std()) * math.sqrt(96) - 1) < 0.1  # std 1/sqrt(K) on tiny presets
