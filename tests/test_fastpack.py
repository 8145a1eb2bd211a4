"""The converter's table-driven slide + pack (convert/fastpack.py) is bit-identical to the reference."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from slidesparse.convert.fastpack import slide_pack
from slidesparse.core.pattern import pack, parse_pattern, slide

from test_pattern import DTYPES, bits, zl_weight


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([4, 6, 8, 10, 12, 16, None]), st.integers(1, 5), st.integers(1, 4), st.integers(0, 15),
       st.integers(0, 2**31 - 1), st.sampled_from(DTYPES))
def test_fast_slide_pack_equals_the_reference(L, n, groups, cut, seed, dtype):
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    k = max(1, groups * pat.group - cut % pat.group)
    w = zl_weight(L, n, k, seed, dtype)
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        w[w == 0] = -0.0  # must come out as +0.0, as in the reference
    v1, m1 = pack(slide(w, pat), pat)
    v2, m2 = slide_pack(w, pat)
    assert torch.equal(bits(v1), bits(v2)) and torch.equal(m1, m2)


def test_fast_slide_pack_rejects_dense_groups():
    from slidesparse.core.pattern import PatternError
    w = torch.ones(2, 16)
    w[:, ::8] = 0
    with pytest.raises(PatternError, match="group"):
        slide_pack(w, "2_8")
