"""`slidesparse verify` (convert/verify.py) catches corrupted values, positions and scales."""

import json
import shutil

import pytest
import torch

from helpers import read_all
from slidesparse.convert import convert
from slidesparse.convert.verify import VerifyError, verify


def test_verify_catches_corruption(tiny, tmp_path):
    src = tiny["tiny-llama"]
    good = tmp_path / "good"
    convert(src, good, sparsity="2_8", dtype="int8")
    name = "model.layers.1.mlp.down_proj"

    def corrupt(tensor, fn):
        d = tmp_path / f"bad-{tensor}-{fn.__name__}"
        shutil.copytree(good, d)
        t = read_all(d)
        f = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][tensor]
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        b0, b1 = hdr[tensor]["data_offsets"]
        new = fn(t[tensor].clone()).contiguous().view(torch.uint8).numpy().tobytes()
        assert len(new) == b1 - b0
        raw[8 + n + b0: 8 + n + b1] = new
        f.write_bytes(bytes(raw))
        return d

    def bump_value(v):  # change one stored non-zero value: only the source can tell
        i = (v != 0).nonzero()[0]
        v[i[0], i[1]] = v[i[0], i[1]] // 2 + 1 if v[i[0], i[1]] != 1 else 3
        return v

    def swap_positions(m):  # positions (1, 0): not ascending
        m[3, 2] = 0x01 | (m[3, 2] & 0xF0)
        return m

    def shift_positions(m):  # ascending but different positions: breaks the canonical form or Z_L
        m[0, :] = torch.where(m[0] & 0xF == 0b0100, torch.full_like(m[0], 0b1000) | (m[0] & 0xF0), m[0] ^ 0x0F)
        return m

    verify(good, source=src)
    d = corrupt(f"{name}.weight_packed", bump_value)
    verify(d)  # still a valid 2:4 / Z_L layer...
    with pytest.raises(VerifyError, match=name):
        verify(d, source=src)  # ...but not the source's
    for fn in (swap_positions, shift_positions):
        with pytest.raises(VerifyError, match=name):
            verify(corrupt(f"{name}.weight_meta", fn))
    d = corrupt(f"{name}.weight_scale", lambda s: s * 2)
    with pytest.raises(VerifyError, match=name):
        verify(d, source=src)
