"""The kernel benchmark's report (bench/report.py) from synthetic rows."""

from __future__ import annotations

import json

import pytest

from slidesparse.core.pattern import parse_pattern

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def _row(layer, variant, part, ms, dtype="fp8_e4m3", sp_k=None):
    n, k = SHAPES[layer]
    return dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype=dtype, variant=variant, part=part, ms=ms,
                impl="x", k_lifted=sp_k or k, alg_id=0)


def _synthetic_rows():
    rows = []
    for layer, (n, k) in SHAPES.items():
        for part, dense in (("gemm", 1.0), ("linear", 1.2), ("traced", 1.1)):
            rows.append(_row(layer, "dense", part, dense))
            for sp, f in (("2_4", 0.5), ("2_8", 0.8)):
                rows.append(_row(layer, sp, part, dense * f, sp_k=parse_pattern(sp).lifted_k(k)))
        rows.append(_row(layer, "dense:torch_scaled_mm", "gemm", 1.13))
        rows.append(_row(layer, "2_8", "dequant", 0.1))
        # in a mixed plan 2_8's sparse bucket would be slower than dense: the tuner keeps dense there
        rows.append(_row(layer, "2_8", "traced_in_op", 1.5))
        rows.append(_row(layer, "2_8", "quant", 0.05, sp_k=parse_pattern("2_8").lifted_k(k)))
    return rows


def test_report_from_synthetic_rows(tmp_path):
    from slidesparse.bench import report
    rows = _synthetic_rows()
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_4") == pytest.approx(2.0)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8") == pytest.approx(1.25)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8", "traced") == pytest.approx(1.25)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8", "tuned") == pytest.approx(1.25)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8", "gemm+dequant") == pytest.approx(1 / 0.9)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "int8", "2_8") is None
    env = {"device": "TestGPU", "command": "slidesparse bench kernel", "copy_gbs": 3000.0,
           "cusparselt": 800, "cusparselt_loaded": 1000, "dense_kernel": {"fp8_e4m3": "vllm_cutlass"}}
    paths = report.write_all(rows, env, tmp_path)
    md = (tmp_path / "kernel_bench.md").read_text()
    assert "| qwen2.5-7b | 16384 | fp8_e4m3 | 2_8 | tuned | 1.250x | 1.05x | yes |" in md
    assert "| qwen2.5-7b | 16384 | int8 | 2_8 | gemm+dequant | not measured |" in md
    assert "fp8_e4m3: `vllm_cutlass`" in md and "not** vLLM's CUTLASS" not in md
    assert "| qwen2.5-7b | fp8_e4m3 | 16384 | 4.000 | 4.520 |" in md  # the extra dense column
    # the library that ran, not only the one torch was built against (LD_PRELOAD can differ)
    assert "cuSPARSELt 1000 (torch built with 800)" in md
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert len(data["rows"]) == len(rows) and data["summary"]["targets"][0]["speedup"] == pytest.approx(1.25)
    bw = report.quant_bandwidth(rows, 3000.0)
    m, k, kl = 16384, 3584, parse_pattern("2_8").lifted_k(3584)
    assert bw[0]["gbs"] == pytest.approx((m * k * 2 + m * kl + m * 4) / 0.05e-3 / 1e9)
    assert all(p.exists() for p in paths) and not list(tmp_path.glob("*.tmp*"))
    # without vLLM the report must say its dense column is not what users run
    report.write_all(rows, {**env, "dense_kernel": {"fp8_e4m3": "torch_scaled_mm"}}, tmp_path)
    assert "not** vLLM's CUTLASS kernel" in (tmp_path / "kernel_bench.md").read_text()
