"""tools/gpu_gemm_compare.py --merge (no GPU): the committed kernel tables come from it, so its
arithmetic is checked here on synthetic runs: sums over a preset's four layers only, every ratio
against vLLM's dense of the run the cell was measured in, the last run winning a repeated cell."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("qkv", "o", "gate_up", "down")


def _rows(rng, variants, dense_scale):
    rows, truth = [], {}
    for m in (64, 16384):
        for pattern, variant in variants:
            total = 0.0
            for layer in LAYERS:
                ms = rng.uniform(0.01, 2.0) * (dense_scale if pattern == "dense" else 1.0)
                total += ms
                rows.append(dict(preset="p", layer=layer, n=8, k=8, m=m, dtype="fp8", pattern=pattern, kp=8,
                                 variant=variant, ms=ms, error=None))
            truth[(m, pattern, variant)] = total
        # an unmeasured variant and a partial one (three layers) must not reach the table
        rows.append(dict(preset="p", layer="qkv", n=8, k=8, m=m, dtype="fp8", pattern="2_8", kp=8,
                         variant="broken", ms=None, error="RuntimeError: x"))
        for layer in LAYERS[:3]:
            rows.append(dict(preset="p", layer=layer, n=8, k=8, m=m, dtype="fp8", pattern="2_8", kp=8,
                             variant="partial", ms=1.0, error=None))
    return rows, truth


def test_merge_ratios_against_the_same_runs_dense(tmp_path):
    rng = random.Random()
    a_rows, a = _rows(rng, [("dense", "vllm_cutlass"), ("dense", "scaled_mm"), ("2_8", "cusparselt_0.8.0+dequant"),
                            ("2_8", "torchao_cutlass")], dense_scale=1.0)
    b_rows, b = _rows(rng, [("dense", "vllm_cutlass"), ("2_8", "torchao_cutlass"), ("2_8", "slidesparse_cutlass")],
                      dense_scale=3.0)
    for name, rows in (("a", a_rows), ("b", b_rows)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(command=f"run {name}", rows=rows)))
    subprocess.run([sys.executable, str(ROOT / "tools/gpu_gemm_compare.py"), "--merge", str(tmp_path / "a.json"),
                    str(tmp_path / "b.json"), "--out", str(tmp_path / "m")], check=True, capture_output=True)
    table = json.loads((tmp_path / "m.json").read_text())["table"]
    got = {(r["m"], r["pattern"], r["variant"]): (r["ms"], r["dense_ms_same_run"]) for r in table}
    assert not any(v in ("broken", "partial") for (_, _, v) in got)
    for m in (64, 16384):
        # cuSPARSELt only in run A: against A's dense
        ms, dense = got[(m, "2_8", "cusparselt_0.8.0+dequant")]
        assert abs(ms - a[(m, "2_8", "cusparselt_0.8.0+dequant")]) < 1e-9
        assert abs(dense - a[(m, "dense", "vllm_cutlass")]) < 1e-9
        # torchao in both runs: B's time, against B's dense
        ms, dense = got[(m, "2_8", "torchao_cutlass")]
        assert abs(ms - b[(m, "2_8", "torchao_cutlass")]) < 1e-9
        assert abs(dense - b[(m, "dense", "vllm_cutlass")]) < 1e-9
    md = (tmp_path / "m.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| p | fp8 | 16384 |"))
    want = b[(16384, "dense", "vllm_cutlass")] / b[(16384, "2_8", "slidesparse_cutlass")]
    assert f"({want:.3f}x)" in line


def test_a_run_without_dense_is_measured_against_the_run_before_and_labels_rename(tmp_path):
    # the session's cuSPARSELt 0.10 run is `--only cusparselt`: no dense column of its own
    rng = random.Random()
    a_rows, a = _rows(rng, [("dense", "vllm_cutlass"), ("2_8", "cusparselt_0.8.0+dequant")], dense_scale=1.0)
    b_rows, b = _rows(rng, [("2_8", "cusparselt_0.8.0+dequant"), ("2_8", "cusparselt_1.0.0+dequant")], dense_scale=1.0)
    for name, rows in (("a", a_rows), ("b", b_rows)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(command=f"run {name}", rows=rows)))
    subprocess.run([sys.executable, str(ROOT / "tools/gpu_gemm_compare.py"), "--merge", str(tmp_path / "a.json"),
                    str(tmp_path / "b.json"), "--out", str(tmp_path / "m"),
                    "--label", "cusparselt_1.0.0+dequant=cusparselt_0.10.0+dequant"], check=True, capture_output=True)
    table = json.loads((tmp_path / "m.json").read_text())["table"]
    got = {(r["m"], r["pattern"], r["variant"]): (r["ms"], r["dense_ms_same_run"]) for r in table}
    assert not any(v == "cusparselt_1.0.0+dequant" for (_, _, v) in got)
    for m in (64, 16384):
        for v, src in (("cusparselt_0.10.0+dequant", "cusparselt_1.0.0+dequant"), ("cusparselt_0.8.0+dequant",) * 2):
            ms, dense = got[(m, "2_8", v)]
            assert abs(ms - b[(m, "2_8", src)]) < 1e-9           # B's time (the later run)
            assert abs(dense - a[(m, "dense", "vllm_cutlass")]) < 1e-9   # against A's dense
    md = (tmp_path / "m.md").read_text()
    assert "cuSPARSELt 0.10.0+dequant" in md and "`cusparselt_1.0.0+dequant` as `cusparselt_0.10.0+dequant`" in md


def test_merge_refuses_a_bad_label(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/gpu_gemm_compare.py"), "--merge", str(tmp_path / "a.json"),
                        "--out", str(tmp_path / "m"), "--label", "nothing"], capture_output=True, text=True)
    assert r.returncode == 2 and "--label takes OLD=NEW" in r.stderr
