"""`slidesparse verify` (convert/verify.py) catches corrupted values, positions and scales."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_all
from slidesparse.core.checkpoint import Checkpoint
from slidesparse.convert import ConvertError, convert
from slidesparse.convert.verify import VerifyError, verify


def test_verify_catches_corruption(tiny, tmp_path):
    src = tiny["tiny-llama"]
    good = tmp_path / "good"
    convert(src, good, sparsity="2_8", dtype="int8")
    name = "model.layers.1.mlp.down_proj"

    def corrupt(tensor, fn):
        d = tmp_path / f"bad-{tensor}-{fn.__name__}"
        shutil.copytree(good, d)
        t = read_all(d)
        f = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][tensor]
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        b0, b1 = hdr[tensor]["data_offsets"]
        new = fn(t[tensor].clone()).contiguous().view(torch.uint8).numpy().tobytes()
        assert len(new) == b1 - b0
        raw[8 + n + b0: 8 + n + b1] = new
        f.write_bytes(bytes(raw))
        return d

    def bump_value(v):  # change one stored non-zero value: only the source can tell
        i = (v != 0).nonzero()[0]
        v[i[0], i[1]] = v[i[0], i[1]] // 2 + 1 if v[i[0], i[1]] != 1 else 3
        return v

    def swap_positions(m):  # positions (1, 0): not ascending
        m[3, 2] = 0x01 | (m[3, 2] & 0xF0)
        return m

    def shift_positions(m):  # ascending but different positions: breaks the canonical form or Z_L
        m[0, :] = torch.where(m[0] & 0xF == 0b0100, torch.full_like(m[0], 0b1000) | (m[0] & 0xF0), m[0] ^ 0x0F)
        return m

    verify(good, source=src)
    d = corrupt(f"{name}.weight_packed", bump_value)
    verify(d)  # still a valid 2:4 / Z_L layer...
    with pytest.raises(VerifyError, match=name):
        verify(d, source=src)  # ...but not the source's
    for fn in (swap_positions, shift_positions):
        with pytest.raises(VerifyError, match=name):
            verify(corrupt(f"{name}.weight_meta", fn))
    d = corrupt(f"{name}.weight_scale", lambda s: s * 2)
    with pytest.raises(VerifyError, match=name):
        verify(d, source=src)


# ----------------------------------------------------------------------------- completeness, finite values

def _edit(d, fn, drop_from_index=()):
    """Apply fn to the tensors of every shard (a dict it may change); drop names from the index too."""
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    for f in sorted(set(idx["weight_map"].values())):
        t = load_file(d / f)
        fn(t)
        save_file(t, d / f, metadata={"format": "pt"})
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k not in drop_from_index}
    idx_path.write_text(json.dumps(idx))


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for name, kw in {"fp8": dict(dtype="fp8"), "bf16": dict(dtype="bf16"), "int8": dict(dtype="int8"),
                     "ct": dict(dtype="int8", sparsity="none", fmt="compressed-tensors")}.items():
        convert(tiny["tiny-llama"], root / name, **{"sparsity": "2_8", **kw})
        out[name] = root / name
    return out


def _copy(converted, kind, tmp_path):
    d = tmp_path / kind
    shutil.copytree(converted[kind], d)
    return d


def _names(d):
    return list(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("kind", ["int8", "ct"])
def test_missing_tensors_are_caught_with_and_without_the_source(tiny, converted, tmp_path, kind):
    for what in ("model.norm.weight", "model.layers.1.", "model.layers.0.mlp.down_proj.",
                 "model.layers.1.post_attention_layernorm.weight"):
        d = _copy(converted, kind, tmp_path / what)
        gone = [n for n in _names(d) if n == what or (what.endswith(".") and n.startswith(what))]
        assert gone
        _edit(d, lambda t: [t.pop(n, None) for n in gone], drop_from_index=gone)
        for source in (None, tiny["tiny-llama"]):
            with pytest.raises(VerifyError, match="missing"):
                verify(d, source=source)


@pytest.mark.parametrize("extra", ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.bias",
                                   "model.layers.2.input_layernorm.weight", "lm_head.bias"])
def test_unexpected_tensors_are_caught(tiny, converted, tmp_path, extra):
    d = _copy(converted, "int8", tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[0]
    t = load_file(d / shard)
    t[extra] = torch.zeros(96, dtype=torch.bfloat16)
    save_file(t, d / shard, metadata={"format": "pt"})
    idx["weight_map"][extra] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    for source in (None, tiny["tiny-llama"]):
        with pytest.raises(VerifyError, match="unexpected tensor"):
            verify(d, source=source)


def _poison(d, name, value, pos=None):
    """Set one element of tensor `name` to `value` (a random element unless pos is given); returns pos."""
    got = []

    def fn(t):
        if name in t:
            x = t[name]
            p = pos or tuple(int(v) for v in (torch.rand(x.dim()) * torch.tensor(x.shape)).long())
            y = x.float()
            y[p] = value
            t[name] = y.to(x.dtype)
            got.append(p)
    _edit(d, fn)
    assert got
    return got[0]


@pytest.mark.parametrize("kind,name,value", [
    ("fp8", "model.layers.1.mlp.gate_proj.weight_packed", float("nan")),
    ("bf16", "model.layers.0.self_attn.q_proj.weight_packed", float("inf")),
    ("bf16", "model.layers.0.self_attn.q_proj.weight_packed", float("nan")),
    ("int8", "model.layers.0.self_attn.v_proj.weight_scale", float("nan")),
    ("int8", "model.layers.0.self_attn.v_proj.weight_scale", float("inf")),
    ("int8", "model.layers.0.self_attn.v_proj.weight_scale", -0.5),
    ("int8", "model.layers.0.self_attn.v_proj.weight_scale", 0.0),
    ("fp8", "model.norm.weight", float("inf")),
    ("int8", "model.embed_tokens.weight", float("nan")),
    ("ct", "model.layers.1.mlp.down_proj.weight_scale", float("-inf")),
    ("ct", "model.layers.1.mlp.down_proj.weight_scale", 0.0),
])
def test_non_finite_values_and_non_positive_scales_are_caught_without_the_source(converted, tmp_path, kind, name,
                                                                                    value):
    d = _copy(converted, kind, tmp_path)
    verify(d)
    _poison(d, name, value)
    with pytest.raises(VerifyError, match="finite|positive") as e:
        verify(d)
    assert name.rsplit(".", 1)[0] in str(e.value)


def test_a_source_with_inf_is_refused_by_verify_too(tiny, converted, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny["tiny-llama"], src)
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="finite"):
        verify(converted["int8"], source=src)


def test_layer_removed_from_index_and_files_is_not_ok(tiny, converted, tmp_path):
    # the reproduction: one projection's four tensors removed everywhere -> "ok: 13 layers verified"
    d = _copy(converted, "int8", tmp_path)
    gone = [n for n in _names(d) if n.startswith("model.layers.1.self_attn.o_proj.")]
    _edit(d, lambda t: [t.pop(n, None) for n in gone], drop_from_index=gone)
    assert len(Checkpoint(d).tensors) == len(Checkpoint(converted["int8"]).tensors) - 4
    with pytest.raises(VerifyError, match="model.layers.1.self_attn.o_proj.* missing"):
        verify(d)
