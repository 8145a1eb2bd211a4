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


def test_version_name_reads_the_parts_and_flags_the_ambiguous_packed_number():
    assert cslt_plan.version_name((0, 10, 0), 1000) == "0.10.0"
    assert cslt_plan.version_name((0, 8, 1), 801) == "0.8.1"
    assert cslt_plan.version_name(None, 800) == "0.8.0"
    # major*1000 + minor*100 + patch: 0.10.0 and 1.0.0 are both 1000
    assert cslt_plan.version_name(None, 1000) == "1.0.0?"
    assert cslt_plan.version_name(None, None) is None


def test_version_parts_come_from_cusparseLtGetProperty():
    import ctypes

    want = {0: 0, 1: 10, 2: 3}
    calls = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
    def get_property(prop, value):
        calls.append(prop)
        if prop not in want:
            return 3   # CUSPARSE_STATUS_INVALID_VALUE
        value[0] = want[prop]
        return 0

    class Lib:
        cusparseLtGetProperty = get_property

    assert cslt_plan._version_parts(Lib()) == (0, 10, 3)
    assert calls == [0, 1, 2]
    want.pop(2)
    assert cslt_plan._version_parts(Lib()) is None    # a failing query: no parts, not wrong ones
    assert cslt_plan._version_parts(object()) is None  # an old library without the symbol
