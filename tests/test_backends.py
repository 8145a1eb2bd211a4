"""Backend selection (runtime/backends.py): environment, checkpoint, device, capability."""

from __future__ import annotations

import pytest
import torch

from slidesparse.runtime.backends import BackendError, available, check_supported, select_backend


def test_backend_selection(monkeypatch):
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
