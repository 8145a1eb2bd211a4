"""bench/cpu_pin.py: CPU lists, the physical cores from a (stand-in) sysfs, the choice of CPUs and
its errors, pinning every thread of a real process, and finding vLLM's engine core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slidesparse.bench import cpu_pin

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="sched_setaffinity is Linux's")


def _sysfs(tmp_path, siblings: dict[int, str]):
    for cpu, text in siblings.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return str(tmp_path)


def test_cpu_lists_parse_and_bad_ones_are_refused():
    assert cpu_pin.parse_cpus("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert cpu_pin.parse_cpus("5") == [5]
    assert cpu_pin.parse_cpus("3,1,3") == [1, 3]
    for bad in ("", "a", "3-1", "-2", "1,,x"):
        with pytest.raises(cpu_pin.PinError, match="not a CPU list"):
            cpu_pin.parse_cpus(bad)


def test_physical_cores_group_hyperthreads_and_fall_back_to_one_cpu_each(tmp_path):
    sys_cpu = _sysfs(tmp_path, {0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"})
    assert cpu_pin.physical_cores(set(range(8)), sys_cpu) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # a sibling this process may not use is left out of its core
    assert cpu_pin.physical_cores({0, 1, 2, 5}, sys_cpu) == [(0,), (1, 5), (2,)]
    # no topology (a container without sysfs): every CPU a core of its own
    assert cpu_pin.physical_cores({2, 3}, str(tmp_path / "none")) == [(2,), (3,)]


@linux_only
def test_auto_takes_two_whole_cores_away_from_cpu_0(tmp_path):
    sys_cpu = _sysfs(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert cpu_pin.resolve("auto", set(range(8)), sys_cpu) == {"engine": [1, 5], "front": [2, 6], "others": [0, 3, 4, 7]}
    with pytest.raises(cpu_pin.PinError, match="two physical cores besides CPU 0"):
        cpu_pin.resolve("auto", {0, 1, 4, 5}, sys_cpu)


@linux_only
@pytest.mark.parametrize("spec,message", [
    ("1,2", "ENGINE_CPUS/FRONT_CPUS"),
    ("1,2/2,3", "overlap"),
    ("1/99", "not available"),
    ("x/1", "not a CPU list"),
])
def test_explicit_cpus_are_checked(spec, message):
    with pytest.raises(cpu_pin.PinError, match=message):
        cpu_pin.resolve(spec, {0, 1, 2, 3})


@linux_only
def test_explicit_cpus_are_taken_as_given():
    assert cpu_pin.resolve("3,1/0", {0, 1, 2, 3}) == {"engine": [1, 3], "front": [0], "others": [2]}
    assert cpu_pin.resolve("1/0", {0, 1})["others"] == []


@linux_only
def test_every_thread_of_a_running_process_is_pinned():
    allowed = sorted(os.sched_getaffinity(0))
    target = allowed[-1]
    child = subprocess.Popen([sys.executable, "-c", (
        "import threading, time, sys\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('up', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) >= 4
        assert cpu_pin.pin_process(child.pid, [target]) == len(tids)
        assert all(os.sched_getaffinity(t) == {target} for t in tids)
        # the pin is per thread: this process is untouched
        assert sorted(os.sched_getaffinity(0)) == allowed
    finally:
        child.kill()
        child.wait()
    with pytest.raises(cpu_pin.PinError, match="no thread left"):
        cpu_pin.pin_process(child.pid, [target])


def test_the_engine_core_is_found_by_name_else_by_its_cpu_time(tmp_path):
    for pid, comm in ((11, "python3"), (12, "VLLM::EngineCor"), (13, "python3")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    assert cpu_pin.engine_core_pid({11: (50.0, 1), 12: (3.0, 2), 13: (1.0, 3)}, str(tmp_path)) == 12
    (tmp_path / "12" / "comm").write_text("python3\n")
    assert cpu_pin.engine_core_pid({11: (50.0, 1), 12: (3.0, 2), 13: (1.0, 3)}, str(tmp_path)) == 11
    assert cpu_pin.engine_core_pid({}, str(tmp_path)) is None
