"""tools/gpu_gemm_clocks.py's table and report (no GPU): the per-cycle share of the MMA peak is what
the kernel analysis in docs/cutlass.md quotes, so its arithmetic is checked here on random runs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_gemm_clocks", ROOT / "tools" / "gpu_gemm_clocks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(rng, kernel, kind, ms, mhz, flops, mma, rnd, reasons=0x1):
    return {"dtype": "fp8", "kernel": kernel, "kind": kind, "round": rnd, "ms": ms, "window": [0.0, 1.0], "sets": 10,
            "flops": flops, "mma_flops": mma, "configs": [None] * 4,
            "clocks": {"n": 20, "sm_mhz": [mhz - 30, mhz, mhz + 10], "power_w": rng.uniform(500, 700), "reasons": reasons}}


def test_rates_and_per_cycle_share_follow_from_time_clock_and_peak():
    tool = _tool()
    rng = random.Random()
    sms = rng.choice([114, 132])
    flops = rng.uniform(5e12, 9e12)
    gamma = 1.5
    dense_ms, sparse_ms = rng.uniform(5, 8), rng.uniform(4, 8)
    dense_mhz, sparse_mhz = rng.uniform(1500, 1980), rng.uniform(1500, 1980)
    runs = []
    for rnd, jitter in enumerate((1.02, 1.0, 0.97)):       # the median round is the middle one
        runs.append(_run(rng, "dense vllm_cutlass", "dense", dense_ms * jitter, dense_mhz * jitter, flops, flops, rnd))
        runs.append(_run(rng, "2_8 slidesparse_cutlass", "sparse", sparse_ms * jitter, sparse_mhz * jitter,
                         flops, flops * gamma, rnd, reasons=0x1 | 0x4))
    runs.append({"dtype": "fp8", "kernel": "2_8 cusparselt gemm only", "error": "RuntimeError: no plan"})
    rows = {r["kernel"]: r for r in tool.table(runs, sms)}
    d, s = rows["dense vllm_cutlass"], rows["2_8 slidesparse_cutlass"]
    assert d["ms"] == pytest.approx(dense_ms) and s["ms"] == pytest.approx(sparse_ms)
    assert d["tflops"] == pytest.approx(flops / dense_ms / 1e9)
    assert s["tflops"] == pytest.approx(flops / sparse_ms / 1e9)
    assert s["mma_tflops"] == pytest.approx(gamma * flops / sparse_ms / 1e9)
    assert d["per_cycle"] == pytest.approx(flops / (dense_ms * 1e-3) / (sms * 8192 * dense_mhz * 1e6))
    assert s["per_cycle"] == pytest.approx(gamma * flops / (sparse_ms * 1e-3) / (sms * 16384 * sparse_mhz * 1e6))
    assert d["events"] == [] and s["events"] == ["power cap"]          # idle is not an event
    md = tool.render(list(rows.values()), runs, {"preset": "p", "m": 16384, "command": "c", "device": "GPU",
                                                 "sms": sms, "torch": "t", "time": "now"})
    assert f"{dense_ms / sparse_ms:.3f}x" in md and "power cap" in md
    assert "2_8 cusparselt gemm only: RuntimeError: no plan" in md
