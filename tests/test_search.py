"""`slidesparse tune`'s checkpoint side (tune/search.py), which runs without a GPU."""

from __future__ import annotations

import json

import pytest


def test_tune_rejects_non_checkpoints(tmp_path):
    from slidesparse.tune.search import TuneError, checkpoint_shapes
    with pytest.raises(TuneError, match="config.json"):
        checkpoint_shapes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(TuneError):
        checkpoint_shapes(tmp_path)


def test_tune_reads_a_converted_checkpoint(tmp_path):
    from slidesparse.convert.make_model import make_model
    from slidesparse.convert.pipeline import convert
    from slidesparse.tune.search import checkpoint_shapes
    make_model("tiny-qwen2", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "ckpt", sparsity="2_8", dtype="int8")
    cfg, shapes = checkpoint_shapes(tmp_path / "ckpt")
    assert cfg.sparsity == "2_8" and cfg.weight_dtype == "int8"
    # the layers vLLM builds: o (240, 240), down (240, 480), qkv 240+80+80, gate_up 2*480
    assert shapes == [(240, 240), (240, 480), (400, 240), (960, 240)]


def test_choose_plan_compares_whole_plans():
    from slidesparse.tune.search import choose_plan
    # sparse fused wins everywhere: all sparse (the dequant stays fused into the consumer)
    assert choose_plan([10, 10, 10], [8, 8, 9], {"sparse": [9, 9, 9.5]}) == ["sparse"] * 3
    # sparse only pays inside a mixed plan at small M: decode sparse, prefill dense
    assert choose_plan([10, 10, 10], [9, 11, 12], {"sparse": [8, 10.5, 12]}) == ["sparse", "dense", "dense"]
    # a small loss at one bucket is worth an all-sparse plan whose fused form wins big elsewhere
    assert choose_plan([10, 10], [10.2, 6], {"sparse": [10.5, 7]}) == ["sparse", "sparse"]
    # nothing wins: dense (and equal times keep the simpler, dense plan)
    assert choose_plan([10, 10], [11, 10], {"sparse": [12, 10]}) == ["dense", "dense"]
    # the CUTLASS kernel (scales in its epilogue) at small M, dense at large M
    assert choose_plan([10, 10], [9.5, 11], {"sparse": [9.8, 11.5], "cutlass": [7, 10.5]}) == ["cutlass", "dense"]
    # CUTLASS everywhere beats a mix when it wins every bucket
    assert choose_plan([10, 10], [9, 9], {"sparse": [9.5, 9.5], "cutlass": [8, 8]}) == ["cutlass", "cutlass"]
    # unquantized layers run one eager op at every M: per-bucket choice
    assert choose_plan([10, 10], [9, 11], None) == ["sparse", "dense"]
