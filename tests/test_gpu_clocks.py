"""bench/gpu_clocks.py: parsing nvidia-smi's samples, summarizing timed runs' windows, the flags,
and the logger process (a stand-in nvidia-smi), alone and beside the matrix driver."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sys
import textwrap
import time

from slidesparse.bench import e2e_matrix as mx
from slidesparse.bench import e2e_worker as wk
from slidesparse.bench import gpu_clocks as gc


def _line(t: float, mhz: float, reasons: int = 0, power="350.5") -> str:
    stamp = dt.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz:.0f}, {power}, 45, 100, 0x{reasons:016x}"


def test_lines_parse_and_bad_ones_are_skipped():
    t = time.time()
    r = gc.parse_line(_line(t, 1980, 0x4))
    assert abs(r["t"] - t) < 1e-3 and r["sm_mhz"] == 1980 and r["power_w"] == 350.5 and r["reasons"] == 4
    assert gc.parse_line(_line(t, 1500, power="[N/A]"))["power_w"] is None
    for bad in ("", "timestamp, clocks.sm", "2026/12/03 08:00:00.000, x, 1, 2, 3, 0x0", "a, b, c"):
        assert gc.parse_line(bad) is None
    assert gc.reason_names(0x4 | 0x40) == ["power cap", "thermal (hardware)"]
    assert gc.reason_names(0x1000) == ["0x1000"]


def test_windows_summarize_their_own_samples_and_flag_differing_runs():
    rng = random.Random()
    t0 = 1_800_000_000.0
    slow = rng.uniform(1200, 1700)
    samples = [gc.parse_line(_line(t0 + i * 0.1, 1980 if i < 20 else slow, 0x1 if i % 7 == 0 else 0))
               for i in range(40)]
    runs = gc.summarize(samples, [[t0, t0 + 1.95], [t0 + 2.0, t0 + 3.95], [t0 + 10, t0 + 11]])
    assert runs[0]["sm_mhz"] == [1980, 1980, 1980] and runs[0]["n"] == 20 and runs[0]["reasons"] == 0x1
    assert runs[1]["sm_mhz"][1] == float(f"{slow:.0f}") and runs[2] is None
    flags = gc.point_flags(runs)
    assert len(flags) == 1 and flags[0].startswith("SM clock") and "1980" in flags[0]
    # idle between steps is not a slowdown; a power cap is
    assert gc.point_flags([runs[0]]) == []
    capped = dict(runs[0], reasons=0x5)
    assert gc.point_flags([capped]) == ["clock events: power cap"]
    assert gc.point_flags(None) == [] and gc.point_flags([None]) == []


FAKE_SMI = textwrap.dedent("""
    import datetime, sys, time
    args = " ".join(sys.argv[1:])
    if "clocks_event_reasons" in args and "{old_only}" == "1":
        print("Field \\"clocks_event_reasons.active\\" is not a valid field to query.", file=sys.stderr)
        sys.exit(2)
    import os
    def line(i):
        stamp = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        mhz = 1980 if i % 2 else 1410
        if os.environ.get("FAKE_CLOCK_FILE"):     # the clock the test sets
            try:
                mhz = int(open(os.environ["FAKE_CLOCK_FILE"]).read())
            except (OSError, ValueError):
                pass
        return f"{{stamp}}, {{mhz}}, 300.0, 40, 90, 0x0000000000000000"
    if "-lms" not in args:
        print(line(1))
        sys.exit(0)
    i = 0
    while True:
        print(line(i), flush=True)
        i += 1
        time.sleep(0.1)
""")


def _fake_smi(tmp_path, old_only=False):
    p = tmp_path / "nvidia-smi"
    p.write_text(f"#!{sys.executable}\n" + FAKE_SMI.format(old_only="1" if old_only else "0"))
    p.chmod(0o755)
    return p


def test_the_logger_samples_until_stopped_and_falls_back_to_the_old_field_name(tmp_path):
    for old in (False, True):
        log = gc.ClockLog.start(tmp_path / f"c{old}.csv", nvidia_smi=str(_fake_smi(tmp_path, old)))
        assert log is not None
        t0 = time.time()
        time.sleep(1.0)
        runs = log.windows([[t0, time.time()]])
        log.stop()
        assert log.proc.poll() is not None
        assert runs[0]["n"] >= 3 and runs[0]["sm_mhz"][0] == 1410 and runs[0]["sm_mhz"][2] == 1980
    # no nvidia-smi, or one that fails: no log, and no error
    assert gc.ClockLog.start(tmp_path / "x.csv", nvidia_smi=str(tmp_path / "missing")) is None
    bad = tmp_path / "bad-smi"
    bad.write_text("#!/bin/sh\nexit 9\n")
    bad.chmod(0o755)
    assert gc.ClockLog.start(tmp_path / "y.csv", nvidia_smi=str(bad)) is None


def test_the_matrix_report_flags_points_whose_runs_saw_other_clocks(tmp_path, monkeypatch):
    """The driver starts the log beside the sweep and names it in the session record; the report
    sets each point's run windows against it and flags the point whose runs ran at other clocks."""
    from test_e2e_matrix import _fake_setup
    plan, ck, fake = _fake_setup(tmp_path, monkeypatch)
    clock = tmp_path / "clock.txt"
    clock.write_text("1980")
    monkeypatch.setenv("FAKE_CLOCK_FILE", str(clock))
    # the stand-in worker times two runs per point; at decode M=128 the second one at 1410 MHz
    worker = (tmp_path / "worker.py").read_text()
    worker = worker.replace('    tok = fake["tok"][p["phase"]][str(p["m"])]\n', textwrap.indent(textwrap.dedent("""
        windows = []
        for run in range(2):
            slow = run == 1 and key == ["decode", 128]
            open(os.environ["FAKE_CLOCK_FILE"], "w").write("1410" if slow else "1980")
            time.sleep(0.25)
            t = time.time()
            time.sleep(0.45)
            windows.append([t, time.time()])
        open(os.environ["FAKE_CLOCK_FILE"], "w").write("1980")
        tok = fake["tok"][p["phase"]][str(p["m"])]
        """).lstrip("\n"), "    "), 1)
    worker = worker.replace('"spread": 0.0, "steps_checked": 1}', '"spread": 0.0, "steps_checked": 1, "run_windows": windows}')
    assert "run_windows" in worker and "FAKE_CLOCK_FILE" in worker
    (tmp_path / "worker.py").write_text(worker)
    smi_dir = tmp_path / "bin"
    smi_dir.mkdir()
    _fake_smi(smi_dir)
    monkeypatch.setenv("PATH", f"{smi_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    mx.run_matrix(plan, out, ck, mx.Timeouts(60, 60), log=lambda s: None)
    recs = mx.read_results(out / mx.RESULTS)[0]
    session = recs[0]
    assert session["kind"] == "session" and (out / "logs" / session["clock_log"]).stat().st_size > 0
    md = (out / "e2e_matrix.md").read_text()
    assert "## The GPU's clocks and the host's CPU in the timed runs" in md
    assert f"{len(plan.points())} point(s) have samples in their runs; /proc/stat over each run: 0 point(s). 1 flagged" in md
    assert "| m1 | bf16 | decode M=128 | 1980 1410 | SM clock 1410-1980 MHz across runs |" in md
    # without the log: no section
    out2 = tmp_path / "out2"
    mx.run_matrix(plan, out2, ck, mx.Timeouts(60, 60), log=lambda s: None, clock_log=False)
    recs2 = mx.read_results(out2 / mx.RESULTS)[0]
    assert recs2[0]["clock_log"] is None and "GPU's clocks" not in (out2 / "e2e_matrix.md").read_text()


def test_the_hosts_cpu_over_a_run_and_its_flag(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  1000 0 200 5000 100 0 10 50 0 0\ncpu0 ...\n")
    a = wk.cpu_snapshot(str(stat))
    assert a[1] == (1210, 50, 6360)
    rng = random.Random()
    busy, steal, idle = rng.randint(100, 900), rng.randint(0, 100), rng.randint(100, 900)
    stat.write_text(f"cpu  {1000 + busy} 0 200 {5000 + idle} 100 0 10 {50 + steal} 0 0\n")
    d = wk.cpu_delta(a, wk.cpu_snapshot(str(stat)))
    total = busy + steal + idle
    assert d["busy"] == round(busy / total, 4) and d["steal"] == round(steal / total, 4) and d["self_cpu_s"] >= 0
    # no /proc/stat: this process's CPU time only
    assert set(wk.cpu_delta(wk.cpu_snapshot(str(tmp_path / "none")), wk.cpu_snapshot(str(tmp_path / "none")))) == {"self_cpu_s"}
    assert gc.host_flags([{"steal": 0.01}, None, {"steal": 0.125}]) == ["CPU steal up to 12.5%"]
    assert gc.host_flags([{"steal": 0.01}, {"self_cpu_s": 1.0}]) == [] and gc.host_flags(None) == []
    lines = gc.report_lines([{"model": "q", "variant": "fp8", "phase": "decode", "m": 256,
                              "run_host": [{"steal": 0.0}, {"steal": 0.05}]}], [])
    assert "| q | fp8 | decode M=256 |  | CPU steal up to 5.0% |" in lines


def _fake_proc(root, procs):
    """procs: {pid: (ppid, utime, stime, processor, comm)} as /proc/PID/stat lines."""
    for pid, (ppid, ut, st, cpu, comm) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        rest = ["S", str(ppid)] + ["0"] * 9 + [str(ut), str(st)] + ["0"] * 23 + [str(cpu)] + ["0"] * 5
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(rest) + "\n")


def test_the_engine_cores_cpu_is_found_among_the_descendants(tmp_path):
    proc, tick = tmp_path / "proc", os.sysconf("SC_CLK_TCK")
    rng = random.Random()
    used = rng.randint(10, 500)
    # 100 the worker; 200 its engine core (a name with spaces and parentheses), 300 a grandchild;
    # 400 someone else's busy process
    base = {100: (1, 5, 5, 0, "python"), 200: (100, 1000, 100, 3, "VLLM::Engine (Core) x"),
            300: (200, 7, 1, 5, "pt_main_thread"), 400: (1, 9000, 0, 2, "other")}
    _fake_proc(proc, base)
    a = wk.cpu_snapshot(str(tmp_path / "stat"), str(proc), pid=100)
    assert set(a[2]) == {200, 300} and a[2][200] == ((1000 + 100) / tick, 3)
    _fake_proc(proc, {**base, 200: (100, 1000 + used, 100, 7, "VLLM::Engine (Core) x"), 400: (1, 99999, 0, 2, "other")})
    wall = rng.uniform(0.5, 5.0)
    d = wk.cpu_delta(a, wk.cpu_snapshot(str(tmp_path / "stat"), str(proc), pid=100), wall)
    assert d["engine_cpu_s"] == round(used / tick, 4) and d["engine_cpu"] == [3, 7]
    assert d["engine_cpu_share"] == round(d["engine_cpu_s"] / wall, 4)
    # no /proc: no engine figures, nothing raised
    assert wk.descendants_cpu(str(tmp_path / "nothing"), 100) == {}
    assert "engine_cpu_s" not in wk.cpu_delta(a[:2], a[:2])
    lines = gc.report_lines([{"model": "q", "variant": "fp8", "phase": "decode", "m": 256,
                              "run_host": [{"engine_cpu_share": s} for s in (0.95, 0.97, 0.5)]},
                             {"model": "q", "variant": "fp8", "phase": "prefill", "m": 65536,
                              "run_host": [{"engine_cpu_share": 0.2}]}], [])
    assert any("2 point(s) recorded" in x and "in 1 of them" in x for x in lines), lines
