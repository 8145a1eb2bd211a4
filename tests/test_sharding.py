"""Tensor-parallel sharding of the packed form (runtime/sharding.py) through the linear method:
every rank computes exactly its slice of the unsharded layer."""

from __future__ import annotations

import pytest
import torch

from helpers import packed, pruned_q, ref_op, w8a8_cfg
from slidesparse.core.format import FormatError
from slidesparse.core.pattern import parse_pattern


def _fake_layer(cls, rank, tp, **attrs):
    """A vLLM linear layer object with only the attributes the loaders read (no process groups)."""
    from torch import nn
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.tp_rank, layer.tp_size = rank, tp
    for k, v in attrs.items():
        setattr(layer, k, v)
    return layer


def _load_layer(layer, names, sources, cfg, k_full, k_local, n_local, shard_ids):
    from slidesparse.runtime.config import SlideSparseLinearMethod, SlideSparseQuantConfig
    method = SlideSparseLinearMethod(SlideSparseQuantConfig(cfg), names)
    method.create_weights(layer, k_local, [n_local], k_full, None, torch.float32)
    for sid, src in zip(shard_ids, sources):
        for suffix, t in src.items():
            param = getattr(layer, suffix)
            if sid is None:
                param.weight_loader(param, t)
            else:
                t = t.clone()
                t.shard_id = sid  # vLLM 0.32 style; 0.26 passes it as the third argument
                param.weight_loader(param, t)
    method.process_weights_after_loading(layer)
    return method


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_column_parallel_shards_with_kv_replication(tp):
    from vllm.model_executor.layers.linear import QKVParallelLinear
    gen = torch.Generator().manual_seed(tp)
    heads, kv_heads, hd, k = 4, 2, 8, 64
    cfg = w8a8_cfg("2_8")
    qs = {s: pruned_q(h * hd, k, "2_8", "int8", gen) for s, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    x = torch.randn(5, k, generator=gen)
    full = torch.cat([ref_op(x, *qs[s], None, "int8", 0) for s in "qkv"], -1)
    q_out, k_out, v_out = full.split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    for rank in range(tp):
        nh, nkv = heads // tp, max(1, kv_heads // tp)
        layer = _fake_layer(QKVParallelLinear, rank, tp, num_heads=nh, num_kv_heads=nkv, head_size=hd,
                            v_head_size=hd, total_num_heads=heads, total_num_kv_heads=kv_heads,
                            num_kv_head_replicas=max(1, tp // kv_heads), output_size_per_partition=(nh + 2 * nkv) * hd)
        names = [f"m.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        _load_layer(layer, names, [packed(*qs[s], "2_8") for s in "qkv"], cfg, k, k, (nh + 2 * nkv) * hd, "qkv")
        out = layer.ss_backend.apply(layer, x, None)
        kv_rank = rank // max(1, tp // kv_heads)
        want = torch.cat([q_out[:, rank * nh * hd:(rank + 1) * nh * hd],
                          k_out[:, kv_rank * nkv * hd:(kv_rank + 1) * nkv * hd],
                          v_out[:, kv_rank * nkv * hd:(kv_rank + 1) * nkv * hd]], -1)
        assert torch.equal(out, want)


@pytest.mark.parametrize("pat,tp", [("2_8", 2), ("2_6", 3), ("2_10", 2), ("2_4", 4)])
def test_merged_and_row_parallel_shards(pat, tp):
    """gate_up column-split and down_proj K-split at group boundaries (odd window offsets included:
    2_6 has 2 windows per group, 2_10 has 4, 2_8 has 3 so rank 1 starts mid-byte of metadata)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    gen = torch.Generator().manual_seed(7)
    p = parse_pattern(pat)
    hidden, inter = 48, p.group * 6 * tp  # inter split into whole groups per rank
    cfg = w8a8_cfg(pat)
    gate, up = pruned_q(inter, hidden, pat, "int8", gen), pruned_q(inter, hidden, pat, "int8", gen)
    down = pruned_q(hidden, inter, pat, "int8", gen)
    x = torch.randn(4, hidden, generator=gen)
    h = torch.randn(4, inter, generator=gen)
    gate_full, up_full = ref_op(x, *gate, None, "int8", 0), ref_op(x, *up, None, "int8", 0)
    per = inter // tp
    partial_sum = 0
    for rank in range(tp):
        mlayer = _fake_layer(MergedColumnParallelLinear, rank, tp, output_sizes=[inter, inter],
                             output_size_per_partition=2 * per)
        _load_layer(mlayer, ["m.gate_proj", "m.up_proj"], [packed(*gate, pat), packed(*up, pat)],
                    cfg, hidden, hidden, 2 * per, [0, 1])
        out = mlayer.ss_backend.apply(mlayer, x, None)
        assert torch.equal(out, torch.cat([gate_full[:, rank * per:(rank + 1) * per],
                                           up_full[:, rank * per:(rank + 1) * per]], -1))
        rlayer = _fake_layer(RowParallelLinear, rank, tp, output_size=hidden, output_size_per_partition=hidden)
        _load_layer(rlayer, ["m.down_proj"], [packed(*down, pat)], cfg, inter, per, hidden, [None])
        # each rank holds exactly its K columns of the dense weight
        assert torch.equal(rlayer.ss_weight, down[0][:, rank * per:(rank + 1) * per])
        partial_sum = partial_sum + ref_op(h[:, rank * per:(rank + 1) * per], rlayer.ss_weight, None, None, None, 0)
    torch.testing.assert_close(partial_sum, ref_op(h, down[0], None, None, None, 0), rtol=1e-5, atol=1e-4)


def test_row_parallel_k_not_multiple_of_L_is_a_clear_error():
    from vllm.model_executor.layers.linear import RowParallelLinear
    from slidesparse.runtime.config import SlideSparseLinearMethod, SlideSparseQuantConfig
    layer = _fake_layer(RowParallelLinear, 0, 2, output_size=32, output_size_per_partition=32)
    method = SlideSparseLinearMethod(SlideSparseQuantConfig(w8a8_cfg("2_6")), ["m.down_proj"])
    with pytest.raises(FormatError, match="not a multiple of L=6"):
        method.create_weights(layer, 160, [32], 320, 32, torch.float32)


def test_loader_rejects_wrong_shapes_and_reports_missing_tensors():
    from vllm.model_executor.layers.linear import RowParallelLinear
    from slidesparse.runtime.config import SlideSparseLinearMethod, SlideSparseQuantConfig
    gen = torch.Generator().manual_seed(3)
    q = pruned_q(16, 48, "2_6", "int8", gen)
    layer = _fake_layer(RowParallelLinear, 0, 1, output_size=16, output_size_per_partition=16)
    method = SlideSparseLinearMethod(SlideSparseQuantConfig(w8a8_cfg("2_8")), ["m.o_proj"])
    method.create_weights(layer, 48, [16], 48, 16, torch.float32)
    with pytest.raises(FormatError, match=r"m.o_proj.weight_packed: checkpoint has shape 16x32, expected 16x36"):
        layer.weight_packed.weight_loader(layer.weight_packed, packed(*q, "2_6")["weight_packed"])
    q8 = packed(*pruned_q(16, 48, "2_8", "int8", gen), "2_8")
    layer.weight_packed.weight_loader(layer.weight_packed, q8["weight_packed"])
    layer.weight_scale.weight_loader(layer.weight_scale, q8["weight_scale"])
    with pytest.raises(FormatError, match="missing m.o_proj.weight_meta, m.o_proj.weight_shape"):
        method.process_weights_after_loading(layer)
