"""Magnitude pruning to Z_L: in every group of L weights along K, zero the Z=2 smallest.

Rule (docs/convert.md): K is zero-padded to a multiple of L (padding counts as zeros of its
group); in each group the `zeros` entries with the smallest key are set to zero, where the key is
|w|, ties broken by the lower column index. A group that already has >= 2 zeros is therefore left
as it is (its zeros are the smallest keys), so already-Z_L weights pass through unchanged.

BitNet codes use a two-level key, (|code|, |master weight|), then the index: existing ternary zeros
go first, then the +-1 codes whose master weights were smallest.

Vectorised over the whole tensor: `zeros` argmin passes over [N, G, L] (argmin returns the first
minimum, which is the lower-index tie-break).
"""

from __future__ import annotations

import torch

from .pattern import Pattern, grouped, parse_pattern


def prune_mask(key: torch.Tensor, pat: Pattern | str) -> torch.Tensor:
    """Bool keep-mask [N, K]: False at the `zeros` smallest keys of each group (ties: lower index).

    key must be >= 0 (float or integer), with 0 for entries that are already zero.
    """
    pat = parse_pattern(pat)
    n, k = key.shape
    if pat.zeros == 0:
        return torch.ones(n, k, dtype=torch.bool, device=key.device)
    g = grouped(key, pat).clone()
    # padding is zero already (pad value 0), so it is picked first, as the rule says
    big = torch.iinfo(g.dtype).max if not g.is_floating_point() else float("inf")
    pos = torch.arange(pat.group, device=key.device)
    drop = None
    for _ in range(pat.zeros):
        hit = pos == g.argmin(-1, keepdim=True)  # argmin: the first minimum, so lower index on ties
        g.masked_fill_(hit, big)
        drop = hit if drop is None else drop | hit
    return ~drop.reshape(n, -1)[:, :k]


# every bit but the sign bit, per float width: non-negative floats order like these integers
_MAGNITUDE = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF), 8: (torch.int64, 0x7FFFFFFFFFFFFFFF)}


def prune_magnitude(w: torch.Tensor, pat: Pattern | str) -> torch.Tensor:
    """Float weights (bf16/fp16/fp32/fp64) -> Z_L-pruned weights, same dtype.

    The key is |w| in the weight's own precision, read from its bits (sign cleared), which orders
    exactly like |w| in float32 (bf16/fp16 -> float32 is exact) but makes argmin ~3x cheaper: this
    is the converter's hot path. Same rule as prune_mask (ties: lower index).
    """
    pat = parse_pattern(pat)
    n, k = w.shape
    if pat.zeros == 0:
        return w.clone()
    idt, mag = _MAGNITUDE[w.element_size()]
    g = grouped(w, pat)
    g = g.clone() if g.data_ptr() == w.data_ptr() else g  # never modify the caller's tensor
    bits = g.view(idt)
    key = bits & mag  # fresh tensor
    top = torch.iinfo(idt).max
    pos = torch.arange(pat.group, device=w.device)
    drop = None
    for _ in range(pat.zeros):
        # first minimum: the lower index wins ties. (Broadcast compares + masked_fill: several
        # times faster than scatter_ on CPU.)
        hit = pos == key.argmin(-1, keepdim=True)
        key.masked_fill_(hit, top)
        drop = hit if drop is None else drop | hit
    bits.masked_fill_(drop, 0)  # +0.0
    return g.reshape(n, -1)[:, :k]


def prune_codes(codes: torch.Tensor, pat: Pattern | str, master: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized codes (int8 / fp8) -> Z_L-pruned codes, same dtype.

    Key |code|, then |master| (if given: BitNet's ternary codes, |code| in {0, 1}), then the
    column index. Keys are small exact integers: |code| of int8 (never -128), the fp8 bits with
    the sign cleared (non-negative fp8 orders like its bits), and for BitNet (|code| << 16 or 32)
    | the magnitude bits of the master weight.
    """
    if master is not None:
        nz = codes.float() != 0
        if master.element_size() <= 2:  # bf16 / fp16 masters: 15 magnitude bits
            key = (nz.to(torch.int32) << 16) | (master.view(torch.int16).to(torch.int32) & 0x7FFF)
        else:
            key = (nz.to(torch.int64) << 32) | master.float().abs().view(torch.int32).to(torch.int64)
    elif codes.dtype == torch.int8:
        key = codes.abs()
    elif codes.dtype == torch.float8_e4m3fn:
        key = codes.view(torch.uint8) & 0x7F
    else:
        key = codes.float().abs()
    keep = prune_mask(key, pat)
    return torch.where(keep, codes, torch.zeros((), dtype=codes.dtype))
