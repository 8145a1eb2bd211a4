"""The GPU's clocks beside the end-to-end sweep: `nvidia-smi` sampling the SM clock, power,
temperature, utilization and the active clock-event (throttle) reasons every 100 ms into a CSV
file for the whole sweep, and, per point, a summary of each timed run's window of it.

Why: on the H200 (2026-12-03) the per-step times of one point, in one engine, at host-bound
prefill (M=1024) and at decode M >= 256 fell into two groups 30-60% apart (16-18 ms against
24-29 ms), the short and the long run of a pair moving together: a state that lasts seconds, not
random pauses. Identical kernels then read 0.65-1.37x. Whether that state is the GPU's clock is
what this log answers; it runs in its own process, so it takes no time from the engine's Python.

    log = ClockLog.start(path)            # None where there is no nvidia-smi
    summary = log.windows([[t0, t1], ...]) # per run: SM MHz min/median/max, power, reasons
    log.stop()

The host's side of the same question, the CPU time a run got, is measured in the worker
(e2e_worker.cpu_delta: this process's CPU seconds, the machine's busy and stolen fractions);
report_lines sets both beside each point.
"""

from __future__ import annotations

import bisect
import datetime as dt
import shutil
import statistics
import subprocess
from pathlib import Path

FIELDS = ("timestamp", "clocks.sm", "power.draw", "temperature.gpu", "utilization.gpu", "clocks_event_reasons.active")
# older drivers name the reasons field clocks_throttle_reasons.active
OLD_FIELDS = FIELDS[:-1] + ("clocks_throttle_reasons.active",)
PERIOD_MS = 100

# nvidia-smi's clock-event reason bits (nvml.h, nvmlClocksEventReason*)
REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap", 0x8: "hardware slowdown",
           0x10: "sync boost", 0x20: "thermal (software)", 0x40: "thermal (hardware)",
           0x80: "power brake (hardware)", 0x100: "display clocks"}
# not a slowdown of a busy GPU: idle between runs, the clocks an application asked for
BENIGN = 0x1 | 0x2


def reason_names(bits: int) -> list[str]:
    return [name for b, name in REASONS.items() if bits & b] + ([f"0x{bits & ~sum(REASONS):x}"]
                                                                 if bits & ~sum(REASONS) else [])


def parse_line(line: str) -> dict | None:
    """One CSV line of the query (noheader, nounits), or None if it is not one."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()   # local time, as time.time()
        return {"t": t, "sm_mhz": float(parts[1]), "power_w": _num(parts[2]), "temp_c": _num(parts[3]),
                "util": _num(parts[4]), "reasons": int(parts[5], 16)}
    except ValueError:
        return None


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:      # "[N/A]"
        return None


def read(path: Path) -> list[dict]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [r for r in (parse_line(ln) for ln in text.splitlines()) if r is not None]


def summarize(samples: list[dict], windows: list[list[float]]) -> list[dict | None]:
    """Per window [start, end] (time.time() seconds): the samples inside it, summarized; None for
    a window with no sample (shorter than the period, or the log lagging). Samples in time order,
    as nvidia-smi writes them and read_logs returns them."""
    times = [s["t"] for s in samples]
    out = []
    for start, end in windows:
        inside = samples[bisect.bisect_left(times, start):bisect.bisect_right(times, end)]
        if not inside:
            out.append(None)
            continue
        sm = sorted(s["sm_mhz"] for s in inside)
        power = [s["power_w"] for s in inside if s["power_w"] is not None]
        bits = 0
        for s in inside:
            bits |= s["reasons"]
        out.append({"n": len(inside), "sm_mhz": [sm[0], statistics.median(sm), sm[-1]],
                    "power_w": statistics.median(power) if power else None, "reasons": bits})
    return out


class ClockLog:
    def __init__(self, proc: subprocess.Popen, path: Path):
        self.proc, self.path = proc, path

    @classmethod
    def start(cls, path: Path, nvidia_smi: str | None = None) -> "ClockLog | None":
        exe = nvidia_smi or shutil.which("nvidia-smi")
        if exe is None:
            return None
        try:
            for fields in (FIELDS, OLD_FIELDS):
                # a driver that does not know a field says so at once: try the older name
                probe = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                        "-i", "0"], capture_output=True, text=True, timeout=30)
                first = probe.stdout.strip().splitlines()[0] if probe.stdout.strip() else ""
                if probe.returncode == 0 and parse_line(first):
                    break
            else:
                return None
        except (OSError, subprocess.SubprocessError):
            return None     # informational only: the sweep goes on without it
        out = open(path, "ab")
        # line-buffered where stdbuf exists, so the file is current while the sweep runs (the
        # report reads it afterwards either way)
        pre = [shutil.which("stdbuf"), "-oL"] if shutil.which("stdbuf") else []
        proc = subprocess.Popen(pre + [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                       "-i", "0", f"-lms={PERIOD_MS}"],
                                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        return cls(proc, path)

    def windows(self, windows: list[list[float]]) -> list[dict | None]:
        return summarize(read(self.path), windows)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def point_flags(clocks: list[dict | None] | None, spread: float = 0.05) -> list[str]:
    """What a point's runs say about the GPU: runs whose median SM clock differ by more than
    `spread`, and reasons other than idle/application clocks."""
    runs = [c for c in (clocks or []) if c]
    if not runs:
        return []
    out = []
    meds = [c["sm_mhz"][1] for c in runs]
    if max(meds) > (1 + spread) * min(meds):
        out.append(f"SM clock {min(meds):.0f}-{max(meds):.0f} MHz across runs")
    bits = 0
    for c in runs:
        bits |= c["reasons"]
    if bits & ~BENIGN:
        out.append("clock events: " + ", ".join(reason_names(bits & ~BENIGN)))
    return out


def read_logs(log_dir: Path) -> list[dict]:
    """Every sample of every clock log of a results folder, in time order."""
    samples = [r for p in sorted(log_dir.glob("gpu_clocks_*.csv")) for r in read(p)]
    return sorted(samples, key=lambda r: r["t"])


def host_flags(host: list[dict | None] | None, steal: float = 0.02) -> list[str]:
    """What a point's runs say about the host's CPU (e2e_worker.cpu_delta): time stolen by the
    hypervisor above `steal` of all CPU time in any run."""
    worst = max((h.get("steal") or 0.0 for h in (host or []) if h), default=0.0)
    return [f"CPU steal up to {worst:.1%}"] if worst > steal else []


HOST_BOUND = 0.9   # the engine core's CPU seconds over a run's wall time at which it never slept


def report_lines(points: list[dict], samples: list[dict], limit: int = 60) -> list[str]:
    """The markdown section: how many points have clock samples or host CPU figures, and the
    flagged ones."""
    rows = []
    clocked = hosted = engined = bound = 0
    for p in points:
        host = p.get("run_host") or []
        shares = [h["engine_cpu_share"] for h in host if h and "engine_cpu_share" in h]
        engined += bool(shares)
        bound += bool(shares) and sorted(shares)[len(shares) // 2] >= HOST_BOUND
        runs = summarize(samples, p.get("run_windows") or []) if samples else []
        clocked += any(runs)
        hosted += any(host)
        flags = point_flags(runs) + host_flags(host)
        if flags:
            meds = " ".join(f"{c['sm_mhz'][1]:.0f}" if c else "-" for c in runs) if any(runs) else ""
            rows.append(f"| {p['model']} | {p['variant']} | {p['phase']} M={p['m']} | {meds} | {'; '.join(flags)} |")
    if not clocked and not hosted:
        return []
    lines = ["## The GPU's clocks and the host's CPU in the timed runs", "",
             f"nvidia-smi every {PERIOD_MS} ms beside the sweep (logs/gpu_clocks_*.csv): {clocked} point(s) have "
             f"samples in their runs; /proc/stat over each run: {hosted} point(s). {len(rows)} flagged: the runs' "
             "median SM clocks more than 5% apart, a clock event other than idle / application clocks, or "
             "more than 2% of the CPU time stolen by the hypervisor. Per run: the warm-up run, then the short "
             "and long run of each pair.", ""]
    if engined:
        lines += [f"vLLM's engine-core process (it schedules and launches every step) over each run: {engined} point(s) "
                  f"recorded (run_host: engine_cpu_s, engine_cpu_share, engine_cpu); in {bound} of them it was busy "
                  f"for at least {HOST_BOUND:.0%} of the median run (it never slept: host-bound steps, or a CPU "
                  "spinning while it waits on the GPU).", ""]
    if rows:
        lines += ["| model | variant | point | median SM MHz per run | flags |", "|---|---|---|---|---|"]
        lines += rows[:limit]
        if len(rows) > limit:
            lines.append(f"| ... {len(rows) - limit} more | | | | |")
    return lines + [""]
