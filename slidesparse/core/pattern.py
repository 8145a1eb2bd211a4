"""Z_L sparsity patterns and the sliding-window rewrite that maps them onto 2:4 hardware.

A weight row is cut along K into groups of L consecutive values, each with at least Z=2 zeros
("2_L"; the paper writes (L-2):L, so 2_8 is 6:8). A group of L = 2P values is covered by W = P-1
windows of 4 values with stride 2: window j sees group positions 2j..2j+3. Every non-zero of the
group is assigned to exactly one window that covers it, at most 2 per window, so each window is
2:4 compliant. Laying the windows side by side gives W' with K' = G*4W columns (G groups), and
the activations are "lifted" the same way, x'[4j+t] = x[2j+t] per group, so that

    x' @ W'^T == x @ W^T        (exactly: every product appears once, the rest are zeros).

Special cases, handled by the same formulas:
  2_4    L=4, W=1: the identity (plain 2:4), gamma 1.
  2_inf  the dense limit, gamma 2: groups of 2 (any values), one window [w0, w1, 0, 0] each,
         lifted activations [x0, x1, 0, 0]; nothing is pruned.

Window assignment is greedy from the left: window j takes every still-unassigned non-zero of pair
j (it is the last window that can), then the leftmost non-zeros of pair j+1 while it has room.
This succeeds iff the group has at most L-2 non-zeros (Hall's condition over runs of pairs), and
is deterministic, so a checkpoint has exactly one valid slid form.

K is zero-padded up to a multiple of the group length; further alignment that a GEMM needs is
added at load time by the runtime, not stored (see docs/format.md).

Packing (the on-disk 2:4 form): each window keeps exactly 2 values, in ascending position order;
a window with fewer than 2 non-zeros keeps explicit zeros at its lowest free positions. The
positions are two 2-bit indices per window, one nibble (i0 | i1 << 2), two windows per byte,
low nibble first, windows numbered along the row. -0.0 is stored as +0.0 everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import SlideSparseError

__all__ = [
    "Pattern", "PatternError", "parse_pattern", "grouped", "group_nonzeros_ok", "check_groups",
    "slide", "unslide", "lift", "lift_index", "is_2to4", "pack", "unpack", "shard_packed",
    "as_bits", "no_negative_zero",
]


class PatternError(SlideSparseError):
    """A sparsity spec or a weight that does not fit the requested pattern."""


@dataclass(frozen=True)
class Pattern:
    """A Z_L pattern. `group` is L (2 for 2_inf); `windows` the 2:4 windows per group."""

    name: str
    L: int | None  # None for 2_inf

    @property
    def group(self) -> int:
        return 2 if self.L is None else self.L

    @property
    def zeros(self) -> int:
        """Zeros each source group must have."""
        return 0 if self.L is None else 2

    @property
    def windows(self) -> int:
        return 1 if self.L is None else self.L // 2 - 1

    @property
    def lifted_group(self) -> int:
        return 4 * self.windows

    @property
    def kept_group(self) -> int:
        """Values stored per group in the packed form (2 per window)."""
        return 2 * self.windows

    @property
    def gamma(self) -> float:
        """K growth factor of the lifted activations, 2(L-2)/L."""
        return self.lifted_group / self.group

    @property
    def paper_name(self) -> str:
        return "dense-limit" if self.L is None else f"{self.L - 2}:{self.L}"

    def num_groups(self, k: int) -> int:
        return -(-k // self.group)

    def padded_k(self, k: int) -> int:
        return self.num_groups(k) * self.group

    def lifted_k(self, k: int) -> int:
        return self.num_groups(k) * self.lifted_group

    def kept_k(self, k: int) -> int:
        return self.num_groups(k) * self.kept_group

    def meta_bytes(self, k: int) -> int:
        """Bytes of position metadata per row."""
        return -(-(self.num_groups(k) * self.windows) // 2)

    def __str__(self) -> str:
        return self.name


# ASCII digits (\d takes any Unicode digit), and few of them: int() of a huge digit string is an error
_UNDERSCORE = re.compile(r"\s*2_([0-9]{1,9}|inf)\s*", re.IGNORECASE)
_COLON = re.compile(r"\s*([0-9]{1,9}):([0-9]{1,9})\s*")
# The largest L accepted. Z_L keeps L-2 of every L weights and the 2:4 GEMM runs on K' = gamma K
# (gamma = 2(L-2)/L), so the best possible speedup over dense is L/(L-2): 1.14x at L=16, 1.03x at
# L=64, less than run-to-run noise beyond (use 2_inf, the dense limit, for that end). Capping L
# also bounds the converter's work: L <= 16 packs through fastpack's tables (2^L masks), larger L
# through the reference slide, whose per-row scratch grows with L/2 - 1 windows per group even
# when a row is shorter than one group.
MAX_L = 64


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Parse '2_8', '6:8' (the paper's form), '2:4', '2_inf' or 'inf' into a Pattern."""
    if isinstance(spec, Pattern):
        return spec
    s = str(spec).strip().lower()
    spec = str(spec) if len(str(spec)) <= 40 else str(spec)[:40] + "..."  # as shown in messages
    if s in ("inf", "2_inf", "dense-limit"):
        return Pattern("2_inf", None)
    m = _UNDERSCORE.fullmatch(s)
    if m:
        L = int(m.group(1))
    else:
        m = _COLON.fullmatch(s)
        if not m:
            raise PatternError(
                f"bad sparsity spec {spec!r}: expected 2_L (2_4, 2_6, 2_8, ..., 2_inf) or (L-2):L (e.g. 6:8)")
        kept, L = int(m.group(1)), int(m.group(2))
        if kept != L - 2:
            raise PatternError(
                f"bad sparsity spec {spec!r}: SlideSparse patterns keep L-2 of every L weights, "
                f"so the colon form must be {L - 2}:{L}")
    if L < 4 or L % 2:
        raise PatternError(f"bad sparsity spec {spec!r}: L must be even and >= 4, got L={L}")
    if L > MAX_L:
        raise PatternError(f"bad sparsity spec {spec!r}: L={L} is above the maximum {MAX_L} (its speedup over dense "
                           f"would be at most {L / (L - 2):.3f}x); use 2_inf for the dense limit")
    return Pattern(f"2_{L}", L)


# ----------------------------------------------------------------------------- groups

def grouped(w: torch.Tensor, pat: Pattern) -> torch.Tensor:
    """[N, K] -> [N, G, group], zero-padded along K (a view when K needs no padding)."""
    if w.dim() != 2:
        raise PatternError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    pad = pat.padded_k(k) - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, pat.group)


def group_nonzeros_ok(w: torch.Tensor, pat: Pattern) -> torch.Tensor:
    """Bool [N, G]: does each group have at least `pat.zeros` zeros?"""
    g = grouped(w, pat)
    return (g != 0).sum(-1) <= pat.group - pat.zeros


def check_groups(w: torch.Tensor, pat: Pattern, name: str = "weight") -> None:
    """Raise PatternError naming the first group with too few zeros."""
    ok = group_nonzeros_ok(w, pat)
    if not bool(ok.all()):
        row, grp = (~ok).nonzero()[0].tolist()
        raise PatternError(
            f"{name}: group {grp} of row {row} (columns {grp * pat.group}..{(grp + 1) * pat.group - 1}) "
            f"has fewer than {pat.zeros} zeros, so it is not {pat.name} sparse")


# ----------------------------------------------------------------------------- slide

def _assign(nz: torch.Tensor, pat: Pattern) -> torch.Tensor:
    """Window index (0..W-1) of every position of each group; -1 where the value is zero.

    nz: bool [..., L]. Greedy from the left, vectorised over all groups (a loop over windows).
    """
    P = pat.group // 2
    pairs = nz.reshape(*nz.shape[:-1], P, 2)
    # int16: window indices reach L/2 - 2, past int8 for L > 258 (a Pattern built directly is not
    # bounded by parse_pattern's MAX_L)
    idx = torch.int16
    win = torch.full(nz.shape, -1, dtype=idx, device=nz.device).reshape(pairs.shape)
    # left[..., p, s]: non-zero at pair p slot s still unassigned
    left = pairs.clone()
    for j in range(pat.windows):
        # window j must take all that is left of pair j
        take_cur = left[..., j, :]
        win[..., j, :] = torch.where(take_cur, torch.tensor(j, dtype=idx, device=nz.device), win[..., j, :])
        room = 2 - take_cur.sum(-1)  # [...]
        left[..., j, :] = False
        if j + 1 < P:
            nxt = left[..., j + 1, :]
            # leftmost first: slot 0 if room >= 1, slot 1 if room >= (1 + nxt[0])
            t0 = nxt[..., 0] & (room >= 1)
            t1 = nxt[..., 1] & (room >= 1 + nxt[..., 0].to(room.dtype))
            take = torch.stack([t0, t1], -1)
            win[..., j + 1, :] = torch.where(take, torch.tensor(j, dtype=idx, device=nz.device),
                                             win[..., j + 1, :])
            left[..., j + 1, :] = nxt & ~take
    if bool(left.any()):
        raise PatternError(f"a group has fewer than {pat.zeros} zeros; cannot slide it into 2:4 windows")
    return win.reshape(nz.shape)


def slide(w: torch.Tensor, pat: Pattern | str) -> torch.Tensor:
    """Pruned weight [N, K] (each group Z_L sparse) -> 2:4-compliant slid weight [N, K'].

    Works for any dtype (values are moved, never combined). Raises PatternError if a group
    has too few zeros; never drops a value.
    """
    pat = parse_pattern(pat)
    g = grouped(w, pat)  # [N, G, group]
    n, G, L = g.shape
    W = pat.windows
    out = torch.zeros(n, G, W, 4, dtype=w.dtype, device=w.device)
    if pat.L is None:
        out[..., 0, 0:2] = g
    else:
        nz = g != 0
        win = _assign(nz, pat)  # [N, G, L]
        pos = torch.arange(L, device=w.device)
        for j in range(W):
            # window j covers positions 2j..2j+3 of the group; t = pos - 2j
            cols = pos[2 * j: 2 * j + 4]
            sel = win[..., 2 * j: 2 * j + 4] == j
            out[..., j, :] = torch.where(sel, g[..., cols], torch.zeros((), dtype=w.dtype, device=w.device))
    out = out.reshape(n, G * 4 * W)
    return no_negative_zero(out)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view (moving values by their bits is exact, and works for fp8 on CPU)."""
    return t if not t.is_floating_point() else t.view(_BITS[t.element_size()])


def no_negative_zero(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        return torch.where(t == 0, zero, t)
    return t


def lift_index(k: int, pat: Pattern | str, device=None) -> torch.Tensor:
    """Source column of each lifted column, int64 [K']; -1 where the lifted value is zero."""
    pat = parse_pattern(pat)
    G, W = pat.num_groups(k), pat.windows
    g = torch.arange(G, device=device).view(G, 1, 1)
    j = torch.arange(W, device=device).view(1, W, 1)
    t = torch.arange(4, device=device).view(1, 1, 4)
    within = 2 * j + t
    src = g * pat.group + within
    valid = (within < pat.group) & (src < k)
    return torch.where(valid, src, torch.full_like(src, -1)).reshape(-1)


def lift(x: torch.Tensor, pat: Pattern | str) -> torch.Tensor:
    """Activations [..., K] -> lifted activations [..., K'] (zero-padded to whole groups).

    Window j of a group is its pairs j and j+1, so the lift is views and one cat, no gather:
    torch.compile turns it into index math inside whatever kernel it fuses it with. Values move by
    their bits, so it is exact for every dtype (fp8 included)."""
    pat = parse_pattern(pat)
    *lead, k = x.shape
    g = pat.num_groups(k)
    bits = as_bits(x)
    if g * pat.group != k:
        bits = torch.nn.functional.pad(bits, (0, g * pat.group - k))
    p = bits.reshape(*lead, g, pat.group // 2, 2)
    if pat.L is None:                      # 2_inf: a window is [x0, x1, 0, 0]
        win = torch.cat([p, torch.zeros_like(p)], dim=-1)
    else:
        win = torch.cat([p[..., :-1, :], p[..., 1:, :]], dim=-1)
    return win.reshape(*lead, g * pat.lifted_group).view(x.dtype)


def unslide(ws: torch.Tensor, pat: Pattern | str, k: int) -> torch.Tensor:
    """Inverse of slide: slid weight [N, K'] -> [N, K] (exact; values are moved, never summed
    with anything but zeros)."""
    pat = parse_pattern(pat)
    n, kp = ws.shape
    if kp != pat.lifted_k(k):
        raise PatternError(f"slid weight has K'={kp}, expected {pat.lifted_k(k)} for K={k} and {pat.name}")
    idx = lift_index(k, pat, device=ws.device)
    valid = idx >= 0
    # every supported dtype is exact in float32 (float64 stays float64)
    work = torch.float64 if ws.dtype == torch.float64 else torch.float32
    src = ws[:, valid].to(work)
    out = torch.zeros(n, k, dtype=work, device=ws.device)
    out.index_add_(1, idx[valid], src)
    if pat.L is not None:
        # each source value must come from one window only
        count = torch.zeros(n, k, dtype=torch.int32, device=ws.device)
        count.index_add_(1, idx[valid], (src != 0).to(torch.int32))
        if bool((count > 1).any()):
            raise PatternError("slid weight assigns a value to two windows; not a valid slid form")
    return no_negative_zero(out.to(ws.dtype))


# ----------------------------------------------------------------------------- 2:4 packing

def is_2to4(ws: torch.Tensor) -> bool:
    """Every aligned window of 4 along the last dim has at most 2 non-zeros."""
    if ws.shape[-1] % 4:
        return False
    return bool(((ws != 0).reshape(*ws.shape[:-1], -1, 4).sum(-1) <= 2).all())


def _window_positions(nz: torch.Tensor) -> torch.Tensor:
    """nz bool [..., 4] with <= 2 true -> kept positions int64 [..., 2], ascending: the non-zeros,
    then the lowest free positions."""
    # rank positions: non-zeros first (by position), then zeros (by position)
    key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=nz.device)
    first2 = key.argsort(-1)[..., :2]
    return first2.sort(-1).values


def pack(ws: torch.Tensor, pat: Pattern | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slid 2:4 weight [N, K'] -> (values [N, K'/2] same dtype, meta uint8 [N, ceil(K'/8)])."""
    pat = parse_pattern(pat)
    n, kp = ws.shape
    if kp % pat.lifted_group:
        raise PatternError(f"K'={kp} is not a whole number of {pat.name} groups")
    if not is_2to4(ws):
        raise PatternError("weight is not 2:4 sparse; slide it first")
    win = ws.reshape(n, -1, 4)
    pos = _window_positions(win != 0)  # [N, nw, 2]
    # gather on the bit pattern: exact for every dtype, and CPU gather has no fp8 kernel
    bits = as_bits(no_negative_zero(win))
    vals = torch.gather(bits, 2, pos).view(ws.dtype).reshape(n, -1)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # [N, nw]
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return vals.contiguous(), meta.contiguous()


def _nibbles(meta: torch.Tensor, nw: int) -> torch.Tensor:
    nib = torch.stack([meta & 0xF, meta >> 4], -1).reshape(meta.shape[0], -1)
    return nib[:, :nw]


def unpack(values: torch.Tensor, meta: torch.Tensor, pat: Pattern | str | None = None) -> torch.Tensor:
    """(values [N, K'/2], meta) -> slid weight [N, K'] (exact inverse of pack)."""
    n, kh = values.shape
    nw = kh // 2
    if kh % 2 or meta.dtype != torch.uint8 or meta.shape != (n, -(-nw // 2)):
        raise PatternError(
            f"packed shapes do not match: values {tuple(values.shape)}, meta {tuple(meta.shape)} {meta.dtype}")
    nib = _nibbles(meta, nw).to(torch.int64)
    i0, i1 = nib & 3, nib >> 2
    if bool((i0 >= i1).any()):
        raise PatternError("corrupt 2:4 metadata: kept positions must be strictly ascending")
    vbits = as_bits(values)
    out = torch.zeros(n, nw, 4, dtype=vbits.dtype, device=values.device)
    out.scatter_(2, torch.stack([i0, i1], -1), vbits.reshape(n, nw, 2))
    return out.view(values.dtype).reshape(n, nw * 4)


def shard_packed(values: torch.Tensor, meta: torch.Tensor, pat: Pattern | str, k: int,
                 rows: tuple[int, int] | None = None,
                 groups: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice a packed weight along N (rows) and/or along K at group boundaries (groups [g0, g1)).

    A plain tensor slice when the group boundary falls on a byte of metadata; otherwise the
    nibbles are shifted.
    """
    pat = parse_pattern(pat)
    if rows is not None:
        values, meta = values[rows[0]:rows[1]], meta[rows[0]:rows[1]]
    if groups is None:
        return values, meta
    g0, g1 = groups
    G = pat.num_groups(k)
    if not (0 <= g0 < g1 <= G):
        raise PatternError(f"group range {groups} outside 0..{G}")
    kg, W = pat.kept_group, pat.windows
    v = values[:, g0 * kg: g1 * kg]
    w0, w1 = g0 * W, g1 * W
    if w0 % 2 == 0:
        m = meta[:, w0 // 2: -(-w1 // 2)].clone()
        if w1 % 2:
            m[:, -1] &= 0xF
    else:
        nib = _nibbles(meta, G * W)[:, w0:w1]
        if nib.shape[1] % 2:
            nib = torch.nn.functional.pad(nib, (0, 1))
        m = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return v.contiguous(), m.contiguous()

