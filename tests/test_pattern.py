"""Property tests of the Z_L core (slidesparse/pattern.py): slide, lift, pack, shard.

Random weights with random Z_L masks (every group gets between 2 and L zeros, K not always a
multiple of L), over L in {4, 6, 8, 10, 12, 16} and 2_inf, in every storage dtype.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from slidesparse.core.pattern import (PatternError, is_2to4, lift, pack, parse_pattern, shard_packed, slide, unpack,
                                 unslide)

LS = [4, 6, 8, 10, 12, 16, None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.float64]
SETTINGS = settings(max_examples=40, deadline=None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def zl_weight(L, n, k, seed, dtype=torch.float64, integer=False):
    """Random [n, k] weight, Z_L sparse for L (2_inf: dense), no zero except the pruned ones."""
    g = torch.Generator().manual_seed(seed)
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    if integer:
        w = torch.randint(1, 8, (n, k), generator=g).to(torch.float64) * (torch.randint(0, 2, (n, k), generator=g) * 2 - 1)
    else:
        w = torch.randn(n, k, generator=g, dtype=torch.float64)
        w = torch.where(w == 0, torch.ones_like(w), w)
    if L is not None:
        G = pat.num_groups(k)
        # per group: a random number of zeros in [2, L], at random positions
        nz = torch.randint(2, L + 1, (n, G, 1), generator=g)
        rank = torch.rand(n, G, L, generator=g).argsort(-1).argsort(-1)
        keep = (rank >= nz).reshape(n, G * L)[:, :k]
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    if dtype == torch.int8:
        return (w.clamp(-7, 7).round() if integer else (w * 30).round().clamp(-127, 127)).to(torch.int8)
    if dtype == torch.float8_e4m3fn:
        # lift kept values off fp8's underflow: one that rounded to -0.0 would be a stray zero
        # (slide stores -0.0 as +0.0, by design), which this helper promises not to make
        tiny = (w != 0) & (w.abs() < 2 ** -6)
        w = torch.where(tiny, torch.sign(w) * 2 ** -6, w)
        return w.clamp(-400, 400).to(dtype)
    return w.to(dtype)


shape = st.tuples(st.sampled_from(LS), st.integers(1, 6), st.integers(1, 5), st.integers(0, 15),
                  st.integers(0, 2**31 - 1))


def _k(L, groups, cut):
    group = 2 if L is None else L
    return max(1, groups * group - cut % group)


@SETTINGS
@given(shape, st.sampled_from(DTYPES))
def test_unslide_slide_and_unpack_pack_are_bit_exact(s, dtype):
    L, n, groups, cut, seed = s
    k = _k(L, groups, cut)
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    w = zl_weight(L, n, k, seed, dtype)
    ws = slide(w, pat)
    assert ws.shape == (n, pat.lifted_k(k)) and ws.dtype == dtype
    assert is_2to4(ws)
    assert bits_equal(unslide(ws, pat, k), w)
    values, meta = pack(ws, pat)
    assert values.shape == (n, pat.kept_k(k)) and meta.shape == (n, pat.meta_bytes(k)) and meta.dtype == torch.uint8
    assert bits_equal(unpack(values, meta, pat), ws)


@SETTINGS
@given(shape)
def test_lifted_product_equals_dense_product(s):
    L, n, groups, cut, seed = s
    k = _k(L, groups, cut)
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    # integer-valued float64: every product and sum is exact, so equality must be exact
    w = zl_weight(L, n, k, seed, integer=True)
    x = torch.randint(-50, 51, (7, k), generator=torch.Generator().manual_seed(seed + 1)).to(torch.float64)
    assert torch.equal(lift(x, pat) @ slide(w, pat).T, x @ w.T)
    # random float64: the same products, summed in another order
    w = zl_weight(L, n, k, seed)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    ref = x @ w.T
    got = lift(x, pat) @ slide(w, pat).T
    scale = (x.abs() @ w.abs().T).clamp(min=1e-300)
    assert float(((got - ref).abs() / scale).max()) <= 1e-12


@SETTINGS
@given(shape, st.sampled_from(DTYPES), st.data())
def test_shard_packed_equals_slicing_the_unpacked_weight(s, dtype, data):
    L, n, groups, cut, seed = s
    k = _k(L, groups, cut)
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    G = pat.num_groups(k)
    values, meta = pack(slide(zl_weight(L, n, k, seed, dtype), pat), pat)
    r0 = data.draw(st.integers(0, n - 1))
    r1 = data.draw(st.integers(r0 + 1, n))
    g0 = data.draw(st.integers(0, G - 1))
    g1 = data.draw(st.integers(g0 + 1, G))
    v, m = shard_packed(values, meta, pat, k, rows=(r0, r1), groups=(g0, g1))
    full = unpack(values, meta, pat)
    want = full[r0:r1, g0 * pat.lifted_group: g1 * pat.lifted_group]
    assert bits_equal(unpack(v, m, pat), want)
    wv, wm = pack(want, pat)
    assert bits_equal(v, wv) and torch.equal(m, wm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float64])
@pytest.mark.parametrize("L", [4, 8, 10, None])
def test_negative_zero_is_stored_as_positive_zero(dtype, L):
    pat = parse_pattern("2_inf" if L is None else f"2_{L}")
    w = zl_weight(L, 3, 2 * pat.group, 5, torch.float32)
    w[w == 0] = -0.0
    w[0, 0] = -0.0
    w = w.to(dtype)  # the cast keeps the sign of zero
    assert bool((bits(w) != 0).sum() > (w != 0).sum())  # the input really has -0.0 bit patterns
    ws = slide(w, pat)
    values, meta = pack(ws, pat)
    zero = torch.zeros((), dtype=dtype)
    for t in (ws, values, unpack(values, meta, pat), unslide(ws, pat, w.shape[1])):
        z = t == 0
        assert torch.equal(bits(t)[z], bits(zero.expand(int(z.sum())).contiguous()))


@pytest.mark.parametrize("L", [4, 6, 8, 10, 12, 16])
def test_a_group_with_fewer_than_two_zeros_raises(L):
    pat = parse_pattern(f"2_{L}")
    w = zl_weight(L, 4, 3 * L, 7)
    w[2, L: 2 * L] = torch.arange(1, L + 1, dtype=w.dtype)  # group 1 of row 2: no zero
    with pytest.raises(PatternError):
        slide(w, pat)
    w[2, L] = 0.0  # one zero is still too few
    with pytest.raises(PatternError):
        slide(w, pat)
    w[2, L + 3] = 0.0
    slide(w, pat)


def test_pack_rejects_non_2to4_and_unpack_rejects_bad_metadata():
    pat = parse_pattern("2_8")
    ws = slide(zl_weight(8, 2, 16, 1), pat)
    bad = ws.clone()
    bad[0, :3] = 1.0
    with pytest.raises(PatternError):
        pack(bad, pat)
    values, meta = pack(ws, pat)
    meta = meta.clone()
    meta[0, 0] = (meta[0, 0] & 0xF0) | (2 | (1 << 2))  # positions (2, 1): not ascending
    with pytest.raises(PatternError):
        unpack(values, meta, pat)


@pytest.mark.parametrize("spec", ["2_5", "2_2", "3:8", "2_x", "", "8", "2_0"])
def test_bad_sparsity_specs_raise(spec):
    with pytest.raises(PatternError):
        parse_pattern(spec)


def test_colon_and_underscore_specs_agree():
    assert parse_pattern("6:8") == parse_pattern("2_8")
    assert parse_pattern("2:4").L == 4 and parse_pattern("inf").L is None
