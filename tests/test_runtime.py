"""Runtime unit tests (no vLLM engine): the reference op, backend selection, TP sharding of the
packed form, checkpoint validation, the torch reference's weight decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slidesparse.convert import convert, dense_weights, make_model
from slidesparse.convert.prune import prune_magnitude
from slidesparse.format import FormatError, SlideSparseConfig
from slidesparse.kernels.reference import masked_dense_ref
from slidesparse.pattern import pack, parse_pattern, slide
from slidesparse.quant import quantize_weight
from slidesparse.runtime import ops  # noqa: F401
from slidesparse.runtime.backends import BackendError, check_supported, select_backend

PATTERNS = ["2_4", "2_6", "2_8", "2_10", "2_inf"]


def _pruned_q(n, k, pat, dtype, gen):
    w = torch.randn(n, k, generator=gen)
    if parse_pattern(pat).L is not None:
        w = prune_magnitude(w, pat)
    return quantize_weight(w, dtype)


def _op(x, w, scale, bias, act, lift_l):
    return torch.ops.slidesparse.reference_linear(x, w, scale, bias, act or "", lift_l, "float64")


@pytest.mark.parametrize("pat", PATTERNS)
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3", "bf16"])
def test_reference_op_lifted_equals_dense_equivalent(pat, dtype):
    gen = torch.Generator().manual_seed(hash((pat, dtype)) % 2**31)
    n, k = 48, 200  # K not a multiple of most L: exercises the zero padding of the last group
    q, scale = _pruned_q(n, k, pat, dtype, gen)
    act = dtype if dtype != "bf16" else None
    x = torch.randn(3, 5, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    p = parse_pattern(pat)
    dense = _op(x, q, scale, bias, act, 0)
    lifted = _op(x, slide(q, p), scale, bias, act, -1 if p.L is None else p.L)
    assert dense.shape == (3, 5, n) and dense.dtype == x.dtype
    if act is not None:
        # integer / fp8 products summed in float64 are exact: the two forms agree to the bit
        assert torch.equal(dense, lifted)
    else:
        torch.testing.assert_close(dense, lifted, rtol=1e-6, atol=1e-6)
    # and both approximate the unquantized layer within the activation-quantization error
    true = masked_dense_ref(x, q, scale, bias).float()
    err = (dense - true).abs().max() / true.abs().max()
    assert err < (0.02 if dtype == "int8" else 0.08 if dtype == "fp8_e4m3" else 1e-5)


def test_reference_op_schema_fake_and_fullgraph_compile():
    gen = torch.Generator().manual_seed(1)
    q, scale = _pruned_q(32, 64, "2_8", "int8", gen)
    x = torch.randn(7, 64, generator=gen)
    torch.library.opcheck(torch.ops.slidesparse.reference_linear.default,
                          (x, q, scale, None, "int8", 0, "float64"))

    def f(x):
        return torch.ops.slidesparse.reference_linear(x, q, scale, None, "int8", 0, "float64") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (3, 11):
        xm = torch.randn(m, 64, generator=gen)
        assert torch.equal(compiled(xm), f(xm))


def test_backend_selection(monkeypatch):
    from slidesparse.runtime.backends import available
    # both backends register on a CPU-only machine (the CUDA one imports lazily)
    assert available() == ["cusparselt", "reference"]
    monkeypatch.delenv("SLIDESPARSE_BACKEND", raising=False)
    assert select_backend(torch.device("cpu")).name == "reference"
    monkeypatch.setenv("SLIDESPARSE_BACKEND", "cusparselt")
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        select_backend(torch.device("cpu"))
    monkeypatch.setenv("SLIDESPARSE_BACKEND", "nope")
    with pytest.raises(BackendError, match="unknown SlideSparse backend 'nope'"):
        select_backend(torch.device("cpu"))
    monkeypatch.setenv("SLIDESPARSE_BACKEND", "reference")
    assert select_backend(torch.device("cpu"), requested="cusparselt").name == "reference"  # env wins
    monkeypatch.setenv("SLIDESPARSE_REFERENCE_MODE", "sideways")
    with pytest.raises(BackendError, match="SLIDESPARSE_REFERENCE_MODE"):
        select_backend(torch.device("cpu"))
    # FP8 below sm_89 and any GPU below sm_80 fail with the reason (CUDA faked: no GPU here)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    with pytest.raises(BackendError, match="sm_89"):
        check_supported("cusparselt", cuda, "fp8_e4m3")
    check_supported("cusparselt", cuda, "int8")
    check_supported("reference", cuda, "fp8_e4m3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    with pytest.raises(BackendError, match="sm_80"):
        check_supported("cusparselt", cuda, "int8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_supported("cusparselt", cuda, "fp8_e4m3")


# ----------------------------------------------------------------------------- TP sharding

def _cfg(pat, dtype="int8"):
    return SlideSparseConfig(sparsity=pat, weight_dtype=dtype, weight_scheme="per_channel_symmetric",
                             activation_dtype=dtype, activation_scheme="per_token_dynamic")


def _packed(q, scale, pat):
    values, meta = pack(slide(q, pat), pat)
    return {"weight_packed": values, "weight_meta": meta, "weight_scale": scale,
            "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}


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
    cfg = _cfg("2_8")
    qs = {s: _pruned_q(h * hd, k, "2_8", "int8", gen) for s, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    x = torch.randn(5, k, generator=gen)
    full = torch.cat([_op(x, *qs[s], None, "int8", 0) for s in "qkv"], -1)
    q_out, k_out, v_out = full.split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    for rank in range(tp):
        nh, nkv = heads // tp, max(1, kv_heads // tp)
        layer = _fake_layer(QKVParallelLinear, rank, tp, num_heads=nh, num_kv_heads=nkv, head_size=hd,
                            v_head_size=hd, total_num_heads=heads, total_num_kv_heads=kv_heads,
                            num_kv_head_replicas=max(1, tp // kv_heads), output_size_per_partition=(nh + 2 * nkv) * hd)
        names = [f"m.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        _load_layer(layer, names, [_packed(*qs[s], "2_8") for s in "qkv"], cfg, k, k, (nh + 2 * nkv) * hd, "qkv")
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
    cfg = _cfg(pat)
    gate, up = _pruned_q(inter, hidden, pat, "int8", gen), _pruned_q(inter, hidden, pat, "int8", gen)
    down = _pruned_q(hidden, inter, pat, "int8", gen)
    x = torch.randn(4, hidden, generator=gen)
    h = torch.randn(4, inter, generator=gen)
    gate_full, up_full = _op(x, *gate, None, "int8", 0), _op(x, *up, None, "int8", 0)
    per = inter // tp
    partial_sum = 0
    for rank in range(tp):
        mlayer = _fake_layer(MergedColumnParallelLinear, rank, tp, output_sizes=[inter, inter],
                             output_size_per_partition=2 * per)
        _load_layer(mlayer, ["m.gate_proj", "m.up_proj"], [_packed(*gate, pat), _packed(*up, pat)],
                    cfg, hidden, hidden, 2 * per, [0, 1])
        out = mlayer.ss_backend.apply(mlayer, x, None)
        assert torch.equal(out, torch.cat([gate_full[:, rank * per:(rank + 1) * per],
                                           up_full[:, rank * per:(rank + 1) * per]], -1))
        rlayer = _fake_layer(RowParallelLinear, rank, tp, output_size=hidden, output_size_per_partition=hidden)
        _load_layer(rlayer, ["m.down_proj"], [_packed(*down, pat)], cfg, inter, per, hidden, [None])
        # each rank holds exactly its K columns of the dense weight
        assert torch.equal(rlayer.ss_weight, down[0][:, rank * per:(rank + 1) * per])
        partial_sum = partial_sum + _op(h[:, rank * per:(rank + 1) * per], rlayer.ss_weight, None, None, None, 0)
    torch.testing.assert_close(partial_sum, _op(h, down[0], None, None, None, 0), rtol=1e-5, atol=1e-4)


def test_row_parallel_k_not_multiple_of_L_is_a_clear_error():
    from vllm.model_executor.layers.linear import RowParallelLinear
    from slidesparse.runtime.config import SlideSparseLinearMethod, SlideSparseQuantConfig
    layer = _fake_layer(RowParallelLinear, 0, 2, output_size=32, output_size_per_partition=32)
    method = SlideSparseLinearMethod(SlideSparseQuantConfig(_cfg("2_6")), ["m.down_proj"])
    with pytest.raises(FormatError, match="not a multiple of L=6"):
        method.create_weights(layer, 160, [32], 320, 32, torch.float32)


def test_loader_rejects_wrong_shapes_and_reports_missing_tensors():
    from vllm.model_executor.layers.linear import RowParallelLinear
    from slidesparse.runtime.config import SlideSparseLinearMethod, SlideSparseQuantConfig
    gen = torch.Generator().manual_seed(3)
    q = _pruned_q(16, 48, "2_6", "int8", gen)
    layer = _fake_layer(RowParallelLinear, 0, 1, output_size=16, output_size_per_partition=16)
    method = SlideSparseLinearMethod(SlideSparseQuantConfig(_cfg("2_8")), ["m.o_proj"])
    method.create_weights(layer, 48, [16], 48, 16, torch.float32)
    with pytest.raises(FormatError, match=r"m.o_proj.weight_packed: checkpoint has shape 16x32, expected 16x36"):
        layer.weight_packed.weight_loader(layer.weight_packed, _packed(*q, "2_6")["weight_packed"])
    q8 = _packed(*_pruned_q(16, 48, "2_8", "int8", gen), "2_8")
    layer.weight_packed.weight_loader(layer.weight_packed, q8["weight_packed"])
    layer.weight_scale.weight_loader(layer.weight_scale, q8["weight_scale"])
    with pytest.raises(FormatError, match="missing m.o_proj.weight_meta, m.o_proj.weight_shape"):
        method.process_weights_after_loading(layer)


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    make_model("tiny-llama", root / "src")
    convert(root / "src", root / "2_8", sparsity="2_8", dtype="int8")
    return root


def _variant(root: Path, name: str) -> Path:
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(root / "2_8", dst)
    return dst


def _qc(path):
    from slidesparse.runtime.config import SlideSparseQuantConfig
    d = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    qc = SlideSparseQuantConfig.from_config(d)
    qc.maybe_update_config(str(path))
    return qc


def test_checkpoint_validation(tiny_ckpt):
    assert _qc(tiny_ckpt / "2_8").cfg.sparsity == "2_8"
    # wrong L: metadata says 2_6, tensors are 2_8
    bad = _variant(tiny_ckpt, "wrong_l")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(sparsity="2_6", L=6)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"_proj.weight_packed has shape .* at 2_6 \(L=6\)"):
        _qc(bad)
    # inconsistent sparsity and L
    cfg["quantization_config"].update(sparsity="2_8", L=6)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="sparsity 2_8 but L=6"):
        _qc(bad)
    # unknown format version
    cfg["quantization_config"].update(L=8, format_version=99)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        _qc(bad)
    # a missing tensor; an extra (dense) tensor
    bad = _variant(tiny_ckpt, "missing")
    st = next(bad.glob("*.safetensors"))
    t = load_file(st)
    del t["model.layers.1.mlp.up_proj.weight_meta"]
    save_file(t, st, metadata={"format": "pt"})
    with pytest.raises(FormatError, match="model.layers.1.mlp.up_proj.weight_meta is missing"):
        _qc(bad)
    t = load_file(next((tiny_ckpt / "2_8").glob("*.safetensors")))
    t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(96, 96)
    save_file(t, st, metadata={"format": "pt"})
    with pytest.raises(FormatError, match="o_proj.weight is stored dense"):
        _qc(bad)
    # a whole projection missing
    t = load_file(next((tiny_ckpt / "2_8").glob("*.safetensors")))
    for s in ("weight_packed", "weight_meta", "weight_scale", "weight_shape"):
        del t[f"model.layers.0.self_attn.k_proj.{s}"]
    save_file(t, st, metadata={"format": "pt"})
    with pytest.raises(FormatError, match="self_attn.k_proj is missing"):
        _qc(bad)


def test_torch_reference_decodes_what_the_converter_wrote(tiny_ckpt):
    from slidesparse.runtime.torch_reference import RefLinear, TorchReference
    ref = TorchReference(str(tiny_ckpt / "2_8"))
    ours = {m: (mod.w_q, mod.scale) for m, mod in ref.model.named_modules() if isinstance(mod, RefLinear)}
    theirs = {m: (q, s) for m, q, s in dense_weights(tiny_ckpt / "2_8")}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for m in ours:
        assert torch.equal(ours[m][0], theirs[m][0]) and torch.equal(ours[m][1], theirs[m][1])


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
