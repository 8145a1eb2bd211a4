"""The reference backend's op (kernels/reference.py): the literally lifted product equals its dense
equivalent bit for bit, approximates the unquantized layer, and compiles with dynamic shapes."""

from __future__ import annotations

import pytest
import torch

from helpers import pruned_q, ref_op
from slidesparse.core.pattern import parse_pattern, slide
from slidesparse.kernels.reference import masked_dense_ref

PATTERNS = ["2_4", "2_6", "2_8", "2_10", "2_inf"]


@pytest.mark.parametrize("pat", PATTERNS)
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3", "bf16"])
def test_reference_op_lifted_equals_dense_equivalent(pat, dtype):
    gen = torch.Generator().manual_seed(hash((pat, dtype)) % 2**31)
    n, k = 48, 200  # K not a multiple of most L: exercises the zero padding of the last group
    q, scale = pruned_q(n, k, pat, dtype, gen)
    act = dtype if dtype != "bf16" else None
    x = torch.randn(3, 5, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    p = parse_pattern(pat)
    dense = ref_op(x, q, scale, bias, act, 0)
    lifted = ref_op(x, slide(q, p), scale, bias, act, -1 if p.L is None else p.L)
    assert dense.shape == (3, 5, n) and dense.dtype == x.dtype
    if act is not None:
        # integer / fp8 products summed in float64 are exact: the two forms agree to the bit
        assert torch.equal(dense, lifted)
    else:
        torch.testing.assert_close(dense, lifted, rtol=1e-6, atol=1e-6)
    # and both approximate the unquantized layer within the activation-quantization error
    true = masked_dense_ref(x, q, scale, bias).float()
    err = (dense - true).abs().max() / true.abs().max()
    assert err < (0.02 if dtype == "int8" else 0.08 if dtype == "fp8_e4m3" else 1e-5)


def test_reference_op_schema_fake_and_fullgraph_compile():
    gen = torch.Generator().manual_seed(1)
    q, scale = pruned_q(32, 64, "2_8", "int8", gen)
    x = torch.randn(7, 64, generator=gen)
    torch.library.opcheck(torch.ops.slidesparse.reference_linear.default,
                          (x, q, scale, None, "int8", 0, "float64"))

    def f(x):
        return torch.ops.slidesparse.reference_linear(x, q, scale, None, "int8", 0, "float64") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (3, 11):
        xm = torch.randn(m, 64, generator=gen)
        assert torch.equal(compiled(xm), f(xm))
