"""The converter end to end on tiny random models of every architecture, against independent
references: a stable-sort pruning reference written here, quant.quantize_weight (the one
definition of the weight scheme), and safetensors' own reader for the output files."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slidesparse.convert import ConvertError, convert, make_model
from slidesparse.convert import writer as writer_mod
from slidesparse.core.errors import SlideSparseError
from slidesparse.core.checkpoint import dense_weights, load_layer
from slidesparse.convert.verify import verify
from slidesparse.core.format import TUNING_FILE, SlideSparseConfig, layer_shapes
from slidesparse.core.tuning import TuningTable
from slidesparse.core.pattern import Pattern, is_2to4, parse_pattern, slide, unpack, unslide
from slidesparse.core.quant import quantize_ternary, quantize_weight
from helpers import bits, read_all

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ref_prune(key: torch.Tensor, L: int) -> torch.Tensor:
    """Keep-mask by the documented rule, written independently: stable sort of each padded group."""
    n, k = key.shape
    pad = (-k) % L
    g = torch.nn.functional.pad(key.double(), (0, pad)).reshape(n, -1, L)
    order = torch.sort(g, dim=-1, stable=True).indices[..., :2]
    drop = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return ~drop.reshape(n, -1)[:, :k]


def modules(cfg):
    for i in range(cfg["num_hidden_layers"]):
        for p in PROJ:
            yield f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}"


CASES = [  # preset, sparsity, dtype
    ("tiny-llama", "2_8", "fp8"),
    ("tiny-llama", "2_10", "int8"),   # K=96, 288: padded groups
    ("tiny-llama", "2_4", "bf16"),
    ("tiny-qwen2", "2_6", "int8"),
    ("tiny-qwen2", "2_inf", "fp16"),
    ("tiny-bitnet", "2_8", "fp8"),
    ("tiny-bitnet", "10:12", "int8"),  # K=128, 320: not multiples of 12 (or 6)
]


@pytest.mark.parametrize("preset,sparsity,dtype", CASES)
def test_convert_tiny_models(tiny, tmp_path, preset, sparsity, dtype):
    src = tiny[preset]
    dst = tmp_path / "out"
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    summary = convert(src, dst, sparsity=sparsity, dtype=dtype)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before  # the source is untouched
    pat = parse_pattern(sparsity)
    cfg_src = json.loads((src / "config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    qc = SlideSparseConfig.from_dict(cfg["quantization_config"])
    assert qc.sparsity == pat.name and qc.weight_dtype.startswith(dtype)
    bitnet = preset == "tiny-bitnet"
    assert qc.weight_scheme == ("ternary_absmean" if bitnet else "per_channel_symmetric" if qc.quantized else "none")
    assert (qc.activation_scheme == "per_token_dynamic") == qc.quantized
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == cfg_src
    assert TuningTable.load(dst / TUNING_FILE) == TuningTable()  # empty until `slidesparse tune`
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out, inp = read_all(dst), read_all(src)
    assert set(index["weight_map"]) == set(out)
    mods = list(modules(cfg_src))
    assert summary["converted"] == len(mods)
    for m in mods:
        w = inp[m + ".weight"]
        n, k = w.shape
        for suffix, shape in layer_shapes(n, k, qc).items():
            assert tuple(out[f"{m}.{suffix}"].shape) == shape
        assert m + ".weight" not in out
        assert out[f"{m}.weight_shape"].tolist() == [n, k]
        slid = unpack(out[f"{m}.weight_packed"], out[f"{m}.weight_meta"], pat)
        assert is_2to4(slid)
        # the expected stored weight, computed independently of the converter's code paths
        if bitnet:
            codes, scale = quantize_ternary(w, qc.weight_dtype)
            if pat.L:
                key = codes.double().abs() * 4 + w.double().abs() / w.double().abs().max()  # |code| first
                codes = torch.where(ref_prune(key, pat.L), codes, torch.zeros((), dtype=codes.dtype))
            want, want_scale = codes, scale
        else:
            pruned = torch.where(ref_prune(w.float().abs(), pat.L), w, torch.zeros((), dtype=w.dtype)) if pat.L else w
            want, want_scale = quantize_weight(pruned.float(), qc.weight_dtype)
        got = load_layer(dst, m)
        want = torch.where(want == 0, torch.zeros((), dtype=want.dtype), want)  # the format stores +0.0
        assert torch.equal(bits(got["weight"]), bits(want)), m
        assert torch.equal(bits(got["slid"]), bits(slid))
        if want_scale is None:
            assert got["scale"] is None and f"{m}.weight_scale" not in out
        else:
            assert torch.equal(got["scale"], want_scale) and out[f"{m}.weight_scale"].dtype == torch.float32
        if pat.L:  # each group of the stored weight really is Z_L
            kp = -(-k // pat.L) * pat.L
            gz = (torch.nn.functional.pad(got["weight"].float(), (0, kp - k)) == 0).reshape(n, -1, pat.L)
            assert bool((gz.sum(-1) >= 2).all())
    # everything else is copied bit for bit (embeddings, norms, lm_head, biases, sub-norms)
    copied = [k for k in inp if not any(k == m + ".weight" for m in mods)]
    for k in copied:
        assert torch.equal(bits(out[k]), bits(inp[k])), k
    assert set(out) == set(copied) | {f"{m}.{s}" for m in mods for s in layer_shapes(1, 1, qc)}
    verify(dst, source=src)
    dw = list(dense_weights(dst))
    assert [m for m, _, _ in dw] == sorted(mods, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])


def test_bitnet_pruning_uses_ternary_zeros_first(tmp_path):
    # a hand-made case: codes of one group and the master weights that decide among the +-1s
    from slidesparse.core.prune import prune_codes
    codes = torch.tensor([[1, 0, -1, 1, 1, -1, 1, 1]], dtype=torch.int8)
    master = torch.tensor([[0.5, 0.01, -0.2, 0.3, 0.1, -0.1, 0.4, 0.9]])
    # one ternary zero (pos 1), then the smallest |master| among +-1: 0.1 at pos 4 and 5 -> pos 4
    assert prune_codes(codes, "2_8", master=master).tolist() == [[1, 0, -1, 1, 0, -1, 1, 1]]
    # without master weights the tie-break is the lower index
    assert prune_codes(codes, "2_8").tolist() == [[0, 0, -1, 1, 1, -1, 1, 1]]


def test_ignore_patterns(tiny, tmp_path):
    src = tiny["tiny-qwen2"]
    dst = tmp_path / "out"
    s = convert(src, dst, ignore=["model.layers.1.mlp.*", r"re:layers\.0\.self_attn\.[qkv]_proj"])
    assert s["ignored"] == 6 and s["converted"] == 8
    out, inp = read_all(dst), read_all(src)
    for m in ("model.layers.1.mlp.gate_proj", "model.layers.0.self_attn.k_proj"):
        assert torch.equal(bits(out[m + ".weight"]), bits(inp[m + ".weight"]))
        assert m + ".weight_packed" not in out
    assert "model.layers.0.self_attn.o_proj.weight_packed" in out
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == ["model.layers.1.mlp.*", r"re:layers\.0\.self_attn\.[qkv]_proj"]
    verify(dst, source=src)


def test_sharded_input_and_output(tiny, tmp_path):
    src = tmp_path / "sharded"
    make_model("tiny-qwen2", src, seed=11, max_shard_bytes=400_000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    single = read_all(tiny["tiny-qwen2"])
    assert {k: bits(v) for k, v in read_all(src).items()}.keys() == single.keys()
    dst = tmp_path / "out"
    s = convert(src, dst, sparsity="2_8", dtype="int8", max_shard_bytes=300_000)
    assert len(s["files"]) > 3
    ref = tmp_path / "ref"
    convert(tiny["tiny-qwen2"], ref, sparsity="2_8", dtype="int8")
    a, b = read_all(dst), read_all(ref)
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    wm = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for name, f in wm.items():
        with safe_open(str(dst / f), framework="pt") as h:
            assert name in h.keys()


# ----------------------------------------------------------------------------- bad sources, atomic output

def _src(tiny, tmp_path, preset="tiny-llama"):
    d = tmp_path / "src"
    shutil.copytree(tiny[preset], d)
    return d


def _edit(d, fn):
    f = d / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def _rand_pos(shape):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return tuple(int(torch.randint(s, (1,), generator=g)) for s in shape)


def _nothing_written(tmp_path, dst):
    assert not dst.exists() and not [p.name for p in dst.parent.iterdir() if ".slidesparse-" in p.name]


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.norm.weight", "model.embed_tokens.weight"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_source_values_fail_naming_the_tensor_and_position(tiny, tmp_path, name, value):
    src = _src(tiny, tmp_path)
    where = []

    def poison(t):
        where.append(_rand_pos(t[name].shape))
        t[name][where[0]] = value
    _edit(src, poison)
    dst = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert(src, dst, sparsity="2_8", dtype="int8")
    assert name in str(e.value) and str(list(where[0])) in str(e.value) and "finite" in str(e.value)
    _nothing_written(tmp_path, dst)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.float8_e5m2, torch.float8_e4m3fn, torch.float64])
def test_projections_and_copied_tensors_must_be_float(tiny, tmp_path, dtype):
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        src = tmp_path / name
        shutil.copytree(tiny["tiny-llama"], src)
        _edit(src, lambda t: t.__setitem__(name, t[name].float().to(dtype)))
        with pytest.raises(ConvertError, match=name.replace(".", r"\.") + r".* (is|BF16)"):
            convert(src, tmp_path / f"out-{name}", sparsity="2_8", dtype="int8")


@pytest.mark.parametrize("damage,words", [
    ("drop model.norm.weight", "model.norm.weight is missing"),
    ("drop model.layers.1", "model.layers.1"),
    ("drop model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight is missing"),
    ("add model.layers.0.self_attn.q_proj.extra", "unexpected tensor 'model.layers.0.self_attn.q_proj.extra'"),
    ("add model.layers.0.mlp.up_proj.weight_scale", "unexpected tensor"),
    ("reshape model.norm.weight", "model.norm.weight has shape"),
])
def test_the_source_must_be_complete(tiny, tmp_path, damage, words):
    src = _src(tiny, tmp_path)
    op, name = damage.split(" ")

    def fn(t):
        if op == "drop":
            for k in [k for k in t if k == name or k.startswith(name + ".")]:
                del t[k]
        elif op == "add":
            t[name] = torch.ones(3)
        else:
            t[name] = torch.ones(7, dtype=t[name].dtype)
    _edit(src, fn)
    with pytest.raises(SlideSparseError, match=words):
        convert(src, tmp_path / "out", sparsity="2_8", dtype="int8")


def test_fp32_weights_that_overflow_fp16_are_refused(tiny, tmp_path):
    src = _src(tiny, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    _edit(src, lambda t: [t.__setitem__(k, v.float()) for k, v in list(t.items())] and None)
    where = []

    def big(t):
        where.append(_rand_pos(t[name].shape))
        t[name][where[0]] = 1e6
    _edit(src, big)
    with pytest.raises(ConvertError, match=f"{name[:-7]}: the weight at .* overflows fp16"):
        convert(src, tmp_path / "out", sparsity="2_inf", dtype="fp16")
    convert(src, tmp_path / "ok", sparsity="2_inf", dtype="bf16")  # bf16 has float32's range


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_compressed_tensors_source_scales_must_be_finite_and_positive(tiny, tmp_path, value):
    ct = tmp_path / "ct"
    convert(tiny["tiny-llama"], ct, sparsity="none", fmt="compressed-tensors", dtype="int8")
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    f = ct / json.loads((ct / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = load_file(f)
    t[name][_rand_pos(t[name].shape)] = value
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=name.replace(".", r"\.")):
        convert(ct, tmp_path / "out", sparsity="2_8")


def test_slide_with_more_windows_than_int8_can_number():
    # Pattern built directly (parse_pattern caps L at 64): 2_300 has 149 windows per group
    pat = Pattern("2_300", 300)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    w = torch.randn(3, 600, generator=g)
    drop = torch.rand(3, 2, 300, generator=g).argsort(-1)[..., :2]
    w = w.reshape(3, 2, 300).scatter(-1, drop, 0.0).reshape(3, 600)
    slid = slide(w, pat)
    assert is_2to4(slid) and torch.equal(unslide(slid, pat, 600), w)


def test_threads_and_shard_limits(tiny, tmp_path):
    for bad in (0, -1, 10**6, 1.5, True):
        with pytest.raises(ConvertError, match="--threads"):
            convert(tiny["tiny-llama"], tmp_path / "out", threads=bad)
    with pytest.raises(ConvertError, match="shard"):
        writer_mod.ShardedWriter(tmp_path, [writer_mod.Planned(f"t{i}", torch.uint8, (1,)) for i in range(100_000)],
                                 max_shard_bytes=1)
    _nothing_written(tmp_path, tmp_path / "out")


def test_overwrite_without_an_atomic_exchange_and_a_run_that_died_between_its_renames(tiny, tmp_path, monkeypatch):
    src, dst = tiny["tiny-llama"], tmp_path / "out"
    convert(src, dst, sparsity="2_8", dtype="int8")
    monkeypatch.setattr(writer_mod, "_exchange", lambda a, b: False)  # file systems without RENAME_EXCHANGE
    convert(src, dst, sparsity="2_6", dtype="int8", overwrite=True)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["sparsity"] == "2_6"
    assert not [p.name for p in tmp_path.iterdir() if ".slidesparse-" in p.name]
    # the state a run killed between "dest -> old" and "tmp -> dest" leaves: the next run puts
    # the previous folder back (and drops the half-committed one), so nothing the user had is lost
    os.rename(dst, tmp_path / ".out.slidesparse-old-99999999-0a1b2c3d")
    shutil.copytree(tiny["tiny-llama"], tmp_path / ".out.slidesparse-tmp-99999999-4e5f6a7b")
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, dst, sparsity="2_8", dtype="int8")
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["sparsity"] == "2_6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    verify(dst, source=src)
