"""Up-front checkpoint validation (runtime/validate.py) through the quantization config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slidesparse.convert import convert, make_model
from slidesparse.core.format import FormatError


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
