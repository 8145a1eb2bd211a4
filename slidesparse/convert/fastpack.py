"""slide + pack in one table-driven gather: the converter's fast path, bit-identical to
pattern.pack(pattern.slide(w)).

The slid-and-packed layout of a group depends only on which of its L positions are non-zero (the
window assignment and the kept positions are functions of that mask). So for L <= 16 all 2^L
masks are run once through the reference slide/pack to build two tables,

    src[mask, s]   source position (0..L-1) of packed slot s (2 per window), or L for a stored zero
    nib[mask, j]   the 4-bit metadata of window j,

and a whole weight is then packed with a handful of vectorised gathers instead of per-window
passes. The tables come from the reference itself, so they cannot disagree with it; tests check
the fast path against the reference on random masks anyway.
"""

from __future__ import annotations

import functools

import torch

from ..core.pattern import Pattern, PatternError, as_bits, pack, parse_pattern, slide

MAX_TABLE_L = 16
# every bit but the sign bit, for the integer view of each float width
_MAGNITUDE = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}


@functools.lru_cache(maxsize=None)
def _tables(L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pat = parse_pattern(f"2_{L}")
    masks = torch.arange(1 << L, dtype=torch.int64)
    bits = (masks.unsqueeze(1) >> torch.arange(L)) & 1  # [2^L, L]
    valid = bits.sum(1) <= L - 2
    # distinct non-zero ids: position + 1 (float64 is exact and slide/pack accept it)
    ids = (bits * (torch.arange(L) + 1)).to(torch.float64)[valid]
    values, meta = pack(slide(ids, pat), pat)  # [V, 2W], [V, ceil(W/2)]
    W = pat.windows
    src = torch.full((1 << L, 2 * W), L, dtype=torch.int64)
    src[valid] = torch.where(values > 0, values.to(torch.int64) - 1, torch.full_like(values, L, dtype=torch.int64))
    nib = torch.zeros((1 << L, W), dtype=torch.uint8)
    nibs = torch.stack([meta & 0xF, meta >> 4], -1).reshape(meta.shape[0], -1)[:, :W]
    nib[valid] = nibs
    return src, nib, valid


def slide_pack(w: torch.Tensor, pat: Pattern | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned weight [N, K] -> (values [N, K'/2], meta uint8 [N, ceil(K'/8)]) == pack(slide(w))."""
    pat = parse_pattern(pat)
    if pat.L is None or pat.L > MAX_TABLE_L:
        return pack(slide(w, pat), pat)
    L, W = pat.group, pat.windows
    src, nib, valid = _tables(L)
    n, k = w.shape
    bits = as_bits(w)
    pad = pat.padded_k(k) - k
    # one extra zero column at the end of every group is where "stored zero" slots point
    g = (torch.nn.functional.pad(bits, (0, pad)) if pad else bits).reshape(n, -1, L)
    G = g.shape[1]
    if w.is_floating_point():
        # non-zero test on the bits without the sign bit, so -0.0 counts as zero (and is never stored:
        # only non-zeros are gathered, stored zeros come from the zero column)
        nz = (g & _MAGNITUDE[w.element_size()]) != 0
    else:
        nz = g != 0
    # the group's non-zero mask, one shift-or per position (far cheaper than a weighted sum)
    u = nz.view(torch.uint8)
    mdt = torch.uint8 if L <= 8 else torch.int32
    mask = u[..., 0].to(mdt)
    for i in range(1, L):
        mask |= u[..., i].to(mdt) << i
    mask = mask.to(torch.int64)
    flat = mask.reshape(-1)
    if not bool(valid.index_select(0, flat).all()):
        bad = (~valid.index_select(0, flat)).nonzero()[0].item()
        row, grp = divmod(bad, G)
        raise PatternError(f"group {grp} of row {row} (columns {grp * L}..{(grp + 1) * L - 1}) has fewer than "
                           f"{pat.zeros} zeros, so it is not {pat.name} sparse")
    gz = torch.nn.functional.pad(g, (0, 1))  # [N, G, L+1], last = 0
    idx = src.index_select(0, flat).reshape(n, G, 2 * W)
    values = torch.gather(gz, 2, idx).reshape(n, -1).view(w.dtype)
    nibs = nib.index_select(0, flat).reshape(n, G * W)
    if nibs.shape[1] % 2:
        nibs = torch.nn.functional.pad(nibs, (0, 1))
    meta = nibs[:, 0::2] | (nibs[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()
