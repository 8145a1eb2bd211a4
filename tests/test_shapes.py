"""The kernel benchmark's preset shapes (bench/shapes.py)."""

from __future__ import annotations

import pytest


def test_presets_shapes():
    from slidesparse.bench.shapes import PresetError, linear_shapes
    assert linear_shapes("qwen2.5-7b") == {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
                                           "down": (3584, 18944)}
    assert linear_shapes("llama3.2-1b") == {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                                            "down": (2048, 8192)}
    with pytest.raises(PresetError):
        linear_shapes("gpt5")
