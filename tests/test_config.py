"""The quantization config (runtime/config.py) owns its model's state: two checkpoints loaded one
after the other in one process share no tuning table and no backend."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from slidesparse.convert import convert, make_model
from slidesparse.core.format import TUNING_FILE
from slidesparse.core.tuning import TuningEntry, TuningError, TuningTable


def _qc(path):
    from slidesparse.runtime.config import SlideSparseQuantConfig
    qc = SlideSparseQuantConfig.from_config(json.loads((Path(path) / "config.json").read_text())["quantization_config"])
    qc.maybe_update_config(str(path))
    return qc


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    make_model("tiny-llama", root / "src")
    convert(root / "src", root / "tuned", sparsity="2_8", dtype="int8")
    convert(root / "src", root / "plain", sparsity="2_8", dtype="int8")
    TuningTable(device="TestGPU", entries=(TuningEntry(160, 144, "int8", 16, "dense"),)).save(root / "tuned" / TUNING_FILE)
    return root


def test_a_second_checkpoint_inherits_nothing(two_ckpts, monkeypatch):
    monkeypatch.delenv("SLIDESPARSE_TUNING", raising=False)
    first = _qc(two_ckpts / "tuned")
    second = _qc(two_ckpts / "plain")
    assert first.tuning.entries[0].backend == "dense" and first.tuning.device == "TestGPU"
    assert second.tuning == TuningTable()  # its own (empty) file, not the first one's table
    b1, b2 = first.backend_for(torch.device("cpu")), second.backend_for(torch.device("cpu"))
    assert b1 is not b2 and first.backend_for(torch.device("cpu")) is b1
    # the config travels to vLLM's worker processes with its table
    assert pickle.loads(pickle.dumps(first)).tuning == first.tuning
    (two_ckpts / "plain" / TUNING_FILE).unlink()
    assert _qc(two_ckpts / "plain").tuning is None


def test_env_tuning_file_overrides_and_bad_files_fail_at_config_time(two_ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv("SLIDESPARSE_TUNING", str(two_ckpts / "tuned" / TUNING_FILE))
    convert(two_ckpts / "src", tmp_path / "c", sparsity="2_8", dtype="int8")
    assert _qc(tmp_path / "c").tuning.device == "TestGPU"
    monkeypatch.delenv("SLIDESPARSE_TUNING")
    (tmp_path / "c" / TUNING_FILE).write_text(json.dumps({"format_version": 1, "entries": [{"n": -1}]}))
    with pytest.raises(TuningError, match="entry 0"):
        _qc(tmp_path / "c")
