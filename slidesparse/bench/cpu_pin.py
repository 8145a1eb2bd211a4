"""Pinning the sweep's two busy host processes to CPUs of their own.

Why: at host-bound points (small models, prefill M <= 4096 and decode on the H200) vLLM's
engine-core process, which schedules and launches every step, runs at 100% of one CPU, and the
same kernels read 0.65-2.09x in two engines of one lease (2026-12-03): neither the GPU's clock nor
the hypervisor moved, and the slowest runs were those where the engine core had only 81-87% of its
CPU. What is left is where the scheduler put it. With `--pin-cpus`, every engine of a sweep runs
its engine core on one physical core and the front-end (the worker's engine.step() loop) on
another, both sides of a core's hyperthreads, so placement is the same for every engine; the
driver and everything else it starts (the next engine's worker while it imports vLLM, the clock
sampler, conversions) keep to the other CPUs.

    spec "auto"             two physical cores that do not hold CPU 0 (interrupts and the shell)
    spec "4,20/5,21"        the engine core's CPUs / the front-end's CPUs (Linux CPU numbers)

Linux only (sched_setaffinity per thread through /proc/PID/task); elsewhere resolve() says why in
one line. Pinning moves no work and changes no kernel: it only removes the choice of CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

ENGINE_CORE_NAMES = ("VLLM::EngineCor", "VLLM::EngineCore")   # setproctitle; comm keeps 15 characters


class PinError(ValueError):
    pass


def physical_cores(allowed: set[int], sys_cpu: str = "/sys/devices/system/cpu") -> list[tuple[int, ...]]:
    """The allowed CPUs grouped by physical core (hyperthread siblings together), in CPU order;
    one group per CPU where the topology cannot be read."""
    groups: dict[tuple[int, ...], None] = {}
    for cpu in sorted(allowed):
        try:
            text = Path(f"{sys_cpu}/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
            sib = tuple(c for c in parse_cpus(text) if c in allowed)
        except (OSError, PinError):
            sib = (cpu,)
        groups.setdefault(sib or (cpu,), None)
    return list(groups)


def parse_cpus(text: str) -> list[int]:
    """A Linux CPU list ("0-3,8,10-11") as sorted CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise PinError(f"not a CPU list: {text!r}") from None
        if a < 0 or b < a:
            raise PinError(f"not a CPU list: {text!r}")
        out.update(range(a, b + 1))
    if not out:
        raise PinError(f"not a CPU list: {text!r}")
    return sorted(out)


def resolve(spec: str, allowed: set[int] | None = None, sys_cpu: str = "/sys/devices/system/cpu") -> dict:
    """{"engine": [cpus], "front": [cpus], "others": [the allowed CPUs left]} for a spec;
    PinError (one line) for one that cannot be served on this machine."""
    if not hasattr(os, "sched_setaffinity"):
        raise PinError("--pin-cpus needs Linux (os.sched_setaffinity)")
    allowed = set(os.sched_getaffinity(0)) if allowed is None else set(allowed)
    if spec == "auto":
        cores = [c for c in physical_cores(allowed, sys_cpu) if 0 not in c]
        if len(cores) < 2:
            raise PinError(f"--pin-cpus auto needs two physical cores besides CPU 0's; this process may use "
                           f"CPUs {sorted(allowed)}")
        e, f = list(cores[0]), list(cores[1])
        return {"engine": e, "front": f, "others": sorted(allowed - set(e) - set(f))}
    engine, sep, front = spec.partition("/")
    if not sep:
        raise PinError(f"--pin-cpus takes 'auto' or ENGINE_CPUS/FRONT_CPUS (e.g. 4,20/5,21), got {spec!r}")
    e, f = parse_cpus(engine), parse_cpus(front)
    if set(e) & set(f):
        raise PinError(f"--pin-cpus: the engine core's and the front-end's CPUs overlap ({spec!r})")
    missing = sorted(set(e + f) - allowed)
    if missing:
        raise PinError(f"--pin-cpus: CPU(s) {missing} are not available to this process (allowed: {sorted(allowed)})")
    return {"engine": e, "front": f, "others": sorted(allowed - set(e) - set(f))}


def pin_process(pid: int, cpus: list[int], proc: str = "/proc") -> int:
    """Every thread of pid onto cpus; returns how many threads were pinned (a thread that ends
    meanwhile is skipped). Threads started later inherit the mask of the thread that starts them."""
    n = 0
    try:
        tids = [int(t) for t in os.listdir(f"{proc}/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
            n += 1
        except ProcessLookupError:
            continue
    if n == 0:
        raise PinError(f"process {pid} has no thread left to pin")
    return n


def engine_core_pid(descendants: dict, proc: str = "/proc") -> int | None:
    """vLLM's engine-core process among this process's descendants ({pid: (cpu_s, cpu)}, as
    e2e_worker.descendants_cpu gives them): the one vLLM names EngineCore, else the one that has
    used the most CPU (it loaded the model and captured the graphs)."""
    for pid in sorted(descendants):
        try:
            if Path(f"{proc}/{pid}/comm").read_text().strip() in ENGINE_CORE_NAMES:
                return pid
        except OSError:
            continue
    if not descendants:
        return None
    return max(descendants, key=lambda p: descendants[p][0])
