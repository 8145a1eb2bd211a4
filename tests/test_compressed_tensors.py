"""compressed-tensors W8A8: as a converter source (values and scales kept), and as the dense
export (`--sparsity none --format compressed-tensors`) that stock vLLM loads."""

import json

import pytest
import torch

from slidesparse.convert import ConvertError, convert, make_model
from slidesparse.core.checkpoint import load_layer
from slidesparse.convert.verify import verify
from slidesparse.convert.writer import Planned, ShardedWriter
from slidesparse.core.pattern import parse_pattern
from slidesparse.core.quant import quantize_weight

from helpers import bits, read_all
from test_pipeline import modules, ref_prune

CT_DTYPE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "tiny-llama"
    make_model("tiny-llama", d, seed=5)
    return d


def write_ct_checkpoint(src, dst, dtype):
    """A tiny compressed-tensors W8A8 checkpoint (as llm-compressor lays it out), made by hand."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    t = read_all(src)
    mods = list(modules(cfg))
    out = {}
    g = torch.Generator().manual_seed(9)
    for name, v in t.items():
        m = name[: -len(".weight")]
        if m in mods:
            # codes need not come from any particular float weight: random codes, random scales
            q, _ = quantize_weight(v.float() * (1 + torch.rand(v.shape, generator=g)), dtype)
            out[name] = q
            out[m + ".weight_scale"] = torch.rand(v.shape[0], 1, generator=g) * 0.01 + 1e-4
        else:
            out[name] = v
    typ = "int" if dtype == "int8" else "float"
    args = {"num_bits": 8, "type": typ, "symmetric": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": f"{typ}-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**args, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**args, "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    w = ShardedWriter(dst, [Planned(k, v.dtype, tuple(v.shape)) for k, v in out.items()], single_file=True)
    for k, v in out.items():
        w.write(k, v)
    w.close()
    return out, mods


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_compressed_tensors_source_keeps_values_and_scales(llama, tmp_path, dtype):
    src = tmp_path / "ct"
    tensors, mods = write_ct_checkpoint(llama, src, dtype)
    dst = tmp_path / "out"
    s = convert(src, dst, sparsity="2_6")  # dtype defaults to the source's
    assert s["dtype"] == dtype
    pat = parse_pattern("2_6")
    for m in mods:
        got = load_layer(dst, m)
        codes = tensors[m + ".weight"]
        want = torch.where(ref_prune(codes.float().abs(), pat.L), codes, torch.zeros((), dtype=codes.dtype))
        want = torch.where(want == 0, torch.zeros((), dtype=want.dtype), want)
        assert torch.equal(bits(got["weight"]), bits(want)), m
        assert torch.equal(got["scale"], tensors[m + ".weight_scale"].reshape(-1))
    out = read_all(dst)
    assert not any(k.endswith(".weight_scale") and k[: -len(".weight_scale")] not in mods for k in out)
    verify(dst, source=src)
    other = "int8" if dtype != "int8" else "fp8"
    with pytest.raises(ConvertError, match="values are kept"):
        convert(src, tmp_path / "x", dtype=other)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_dense_compressed_tensors_export(llama, tmp_path, dtype):
    dst = tmp_path / "ct"
    convert(llama, dst, sparsity="none", fmt="compressed-tensors", dtype=dtype)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "sparsity_config" not in qc
    assert qc["format"] == ("int-quantized" if dtype == "int8" else "float-quantized")
    grp = qc["config_groups"]["group_0"]
    assert grp["targets"] == ["Linear"] and "lm_head" in qc["ignore"]
    assert grp["weights"]["strategy"] == "channel" and grp["weights"]["symmetric"] and not grp["weights"]["dynamic"]
    assert grp["input_activations"]["strategy"] == "token" and grp["input_activations"]["dynamic"]
    assert grp["weights"]["type"] == grp["input_activations"]["type"] == ("int" if dtype == "int8" else "float")
    # the parser stock vLLM uses accepts the block as W8A8 per-channel / per-token dynamic
    from compressed_tensors.quantization import QuantizationArgs
    QuantizationArgs.model_validate(grp["weights"])
    QuantizationArgs.model_validate(grp["input_activations"])
    assert not (dst / "slidesparse_tuning.json").exists()
    out, inp = read_all(dst), read_all(llama)
    mods = list(modules(cfg))
    for m in mods:
        q, s = quantize_weight(inp[m + ".weight"], dtype)
        assert out[m + ".weight"].dtype == q.dtype
        assert torch.equal(bits(out[m + ".weight"]), bits(q)), m
        assert out[m + ".weight_scale"].shape == (q.shape[0], 1) and out[m + ".weight_scale"].dtype == torch.float32
        assert torch.equal(out[m + ".weight_scale"].reshape(-1), s)
    for k, v in inp.items():
        if k[: -len(".weight")] not in mods:
            assert torch.equal(bits(out[k]), bits(v))
    assert set(out) == set(inp) | {m + ".weight_scale" for m in mods}
    verify(dst, source=llama)


def test_vllm_parses_the_export_config(llama, tmp_path):
    ct = pytest.importorskip("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors")
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer
    dst = tmp_path / "ct"
    convert(llama, dst, sparsity="none", fmt="compressed-tensors", dtype="int8",
            ignore=["model.layers.1.mlp.*", r"re:layers\.0\.self_attn\.[qkv]_proj"])
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    conf = ct.CompressedTensorsConfig.from_config(qc)
    w = conf.target_scheme_map["Linear"]["weights"]
    a = conf.target_scheme_map["Linear"]["input_activations"]
    assert conf._is_dynamic_token_w8a8(w, a)
    # our --ignore patterns, as vLLM matches them on its fused layers
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    ign = conf.ignore
    assert should_ignore_layer("lm_head", ign, fused)
    assert should_ignore_layer("model.layers.1.mlp.gate_up_proj", ign, fused)
    assert should_ignore_layer("model.layers.1.mlp.down_proj", ign, fused)
    assert should_ignore_layer("model.layers.0.self_attn.qkv_proj", ign, fused)
    assert not should_ignore_layer("model.layers.0.self_attn.o_proj", ign, fused)
    assert not should_ignore_layer("model.layers.0.mlp.gate_up_proj", ign, fused)
    assert not should_ignore_layer("model.layers.1.self_attn.qkv_proj", ign, fused)
    out = read_all(dst)
    assert out["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    verify(dst, source=llama)


def test_sparsity_none_needs_compressed_tensors_format(llama, tmp_path):
    with pytest.raises(ConvertError, match="--format compressed-tensors"):
        convert(llama, tmp_path / "x", sparsity="none")
    with pytest.raises(ConvertError, match="W8A8"):
        convert(llama, tmp_path / "y", sparsity="none", fmt="compressed-tensors", dtype="bf16")


def test_pruned_dense_export(llama, tmp_path):
    """--format compressed-tensors with a pattern: the SlideSparse weights, unslid, for stock vLLM."""
    ct_dir, ss_dir = tmp_path / "ct", tmp_path / "ss"
    convert(llama, ct_dir, sparsity="2_8", fmt="compressed-tensors", dtype="int8")
    convert(llama, ss_dir, sparsity="2_8", dtype="int8")
    cfg = json.loads((ct_dir / "config.json").read_text())
    assert cfg["slidesparse_export"]["sparsity"] == "2_8"
    out = read_all(ct_dir)
    for m in modules(cfg):
        ss = load_layer(ss_dir, m)
        assert torch.equal(out[m + ".weight"], ss["weight"]), m
        assert torch.equal(out[m + ".weight_scale"].reshape(-1), ss["scale"])
    verify(ct_dir, source=llama)
