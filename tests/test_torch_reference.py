"""The pure-torch oracle (runtime/torch_reference.py) holds exactly what the converter wrote."""

from __future__ import annotations

import pytest
import torch

from slidesparse.convert import convert, make_model
from slidesparse.core.checkpoint import dense_weights


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr")
    make_model("tiny-llama", root / "src")
    convert(root / "src", root / "2_8", sparsity="2_8", dtype="int8")
    return root


def test_torch_reference_decodes_what_the_converter_wrote(tiny_ckpt):
    from slidesparse.runtime.torch_reference import RefLinear, TorchReference
    ref = TorchReference(str(tiny_ckpt / "2_8"))
    ours = {m: (mod.w_q, mod.scale) for m, mod in ref.model.named_modules() if isinstance(mod, RefLinear)}
    theirs = {m: (q, s) for m, q, s in dense_weights(tiny_ckpt / "2_8")}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for m in ours:
        assert torch.equal(ours[m][0], theirs[m][0]) and torch.equal(ours[m][1], theirs[m][1])
