"""The cusparselt backend's CPU side (runtime/cusparselt_backend.py): it imports and refuses CPU
weights with the reason, and turns a tuning table into each layer's bucket plan."""

from __future__ import annotations

import pytest
import torch

from slidesparse.core.pattern import parse_pattern
from slidesparse.core.tuning import TuningTable
from slidesparse.kernels import sparse_linear as sl
from slidesparse.runtime.backend import BackendError, SlidWeight
from slidesparse.runtime.backends import BACKENDS
from slidesparse.runtime.cusparselt_backend import CusparseltBackend, bucket_plan


def test_imports_on_cpu_and_refuses_cpu_weights():
    assert BACKENDS["cusparselt"] is CusparseltBackend
    assert torch.ops.slidesparse.sparse_linear.default is not None
    sw = SlidWeight(parse_pattern("2_8"), 16, 32, "int8", "int8", torch.zeros(32, 24, dtype=torch.int8),
                    torch.ones(32))
    with pytest.raises(BackendError, match="CUDA"):
        CusparseltBackend().prepare(torch.nn.Module(), sw)


def test_bucket_plan_from_the_tuning_table():
    table = TuningTable.from_dict({"format_version": 1, "entries": [
        {"n": 64, "k_lifted": 96, "dtype": "int8", "m_max": 4096, "backend": "sparse", "alg_id": 2, "split_k": 3},
        {"n": 64, "k_lifted": 96, "dtype": "int8", "m_max": 16, "backend": "dense", "alg_id": 0},
        {"n": 64, "k_lifted": 96, "dtype": "fp8_e4m3", "m_max": 16, "backend": "sparse", "alg_id": 1}]})
    plan, configs = bucket_plan(table, 64, 96, "int8")
    assert plan == [16, sl.DENSE, 0, 1, 4096, sl.SPARSE, 2, 3] and configs == []
    assert sl.choose(plan, 1) == (sl.DENSE, 0, 1) and sl.choose(plan, 16) == (sl.DENSE, 0, 1)
    assert sl.choose(plan, 17) == (sl.SPARSE, 2, 3) and sl.choose(plan, 10 ** 6) == (sl.SPARSE, 2, 3)
    assert sl.plan_kinds(plan) == {sl.DENSE, sl.SPARSE}
    # an untuned shape, or no table at all: the sparse GEMM with cuSPARSELt's default everywhere
    assert bucket_plan(table, 64, 96, "bf16") == ([], []) and bucket_plan(None, 64, 96, "int8") == ([], [])
    # cutlass buckets index the layer's list of configuration names
    cut = TuningTable.from_dict({"format_version": 1, "entries": [
        {"n": 8, "k_lifted": 12, "dtype": "fp8_e4m3", "m_max": m, "backend": "cutlass", "config": c}
        for m, c in ((16, "b"), (64, "a"), (256, "b"))]})
    assert bucket_plan(cut, 8, 12, "fp8_e4m3") == ([16, sl.CUTLASS, 0, 1, 64, sl.CUTLASS, 1, 1,
                                                    256, sl.CUTLASS, 0, 1], ["b", "a"])
    assert sl.choose([], 5) == (sl.SPARSE, 0, 1) and sl.plan_kinds([]) == {sl.SPARSE}
