"""The plan-caching cuSPARSELt path's CPU-visible contract (its GPU tests are tests/gpu/test_cslt_plan.py)."""

import pytest
import torch

from slidesparse.kernels import cslt_plan, cusparselt as cl


def test_plan_path_is_the_default_and_env_overrides(monkeypatch):
    monkeypatch.delenv(cl.IMPL_ENV, raising=False)
    assert cl._impl() == "plan"
    monkeypatch.setenv(cl.IMPL_ENV, "torch")
    assert cl._impl() == "torch"
    monkeypatch.setenv(cl.IMPL_ENV, "cublas")
    with pytest.raises(cl.CusparseltError, match="must be 'plan' or 'torch'"):
        cl._impl()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_unavailable_without_a_gpu_and_says_so():
    assert cslt_plan.available() is False


def test_opaque_buffers_are_16_byte_aligned():
    # cusparseLt.h declares its structs alignas(16); a misaligned buffer would be undefined behaviour
    for _ in range(32):
        assert cslt_plan._Opaque().ptr.value % 16 == 0


def test_padded_n_matches_the_weight_padding():
    for n in (1, 31, 32, 33, 3072, 18944):
        w = torch.zeros(n, 64, dtype=torch.int8)
        assert cl.pad_weight(w).shape[0] == cl.padded_n(n)
