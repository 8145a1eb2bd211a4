"""The kernel benchmark's report (bench/report.py) from synthetic rows."""

from __future__ import annotations

import json

import pytest

from slidesparse.core.pattern import parse_pattern


def _synthetic_rows():
    rows = []
    for layer, (n, k) in {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}.items():
        for part, dense in (("gemm", 1.0), ("linear", 1.2)):
            rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant="dense",
                             part=part, ms=dense, impl="x", k_lifted=k, alg_id=0))
            for sp, f in (("2_4", 0.5), ("2_8", 0.8)):
                rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant=sp,
                                 part=part, ms=dense * f, impl="y", k_lifted=parse_pattern(sp).lifted_k(k), alg_id=0))
        rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant="2_8",
                         part="quant", ms=0.05, impl="t", k_lifted=parse_pattern("2_8").lifted_k(k), alg_id=0))
    return rows


def test_report_from_synthetic_rows(tmp_path):
    from slidesparse.bench import report
    rows = _synthetic_rows()
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_4") == pytest.approx(2.0)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8") == pytest.approx(1.25)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "int8", "2_8") is None
    env = {"device": "TestGPU", "command": "slidesparse bench kernel", "copy_gbs": 3000.0,
           "cusparselt": 800, "cusparselt_loaded": 1000}
    paths = report.write_all(rows, env, tmp_path)
    md = (tmp_path / "kernel_bench.md").read_text()
    assert "| qwen2.5-7b | 16384 | fp8_e4m3 | 2_8 | 1.250x" in md and "not measured" in md
    # the library that ran, not only the one torch was built against (LD_PRELOAD can differ)
    assert "cuSPARSELt 1000 (torch built with 800)" in md
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert len(data["rows"]) == len(rows) and data["summary"]["targets"][1]["linear"] == pytest.approx(2.0)
    bw = report.quant_bandwidth(rows, 3000.0)
    m, k, kl = 16384, 3584, parse_pattern("2_8").lifted_k(3584)
    assert bw[0]["gbs"] == pytest.approx((m * k * 2 + m * kl + m * 4) / 0.05e-3 / 1e9)
    assert all(p.exists() for p in paths) and not list(tmp_path.glob("*.tmp*"))
