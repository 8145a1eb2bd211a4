"""The tuning table (slidesparse_tuning.json): what the GPU runtime runs for each layer shape and M.

`slidesparse tune` measures, per vLLM linear layer shape (N, K' = lifted K, weight dtype) and per
M bucket, the sparse path against the dense one on the GPU the checkpoint will serve on, and
writes one entry per bucket. The runtime picks, for a call with M rows, the entry with the
smallest m_max >= M (the last bucket also covers larger M). A checkpoint without entries runs the
sparse path with cuSPARSELt's default algorithm everywhere.

    backend "sparse"   the lifted 2:4 GEMM, cuSPARSELt, with algorithm alg_id and split_k
            "cutlass"  the lifted 2:4 GEMM, SlideSparse's CUTLASS kernel (csrc/) with the scales and
                       the bias in its epilogue, configuration `config`
            "dense"    the dense GEMM of the dtype on the unslid weight (then kept in memory too)

The table is validated once, when it is read: a bad file fails with one line naming the entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from .errors import SlideSparseError
from .io import atomic_write
from .quant import DTYPES

TUNING_VERSION = 1
BACKENDS = ("sparse", "cutlass", "dense")
MAX_CONFIG = 200          # characters of a CUTLASS configuration name
MAX_ALG_ID = 255          # cuSPARSELt 0.8 has a few tens of configurations per problem
MAX_SPLIT_K = 64
MAX_M = 1 << 24
_MEASURED = ("us", "us_sparse", "us_dense")
_LEGACY = ("split_k_buffers",)  # written by the first tuner, always null; read and dropped


class TuningError(SlideSparseError):
    """A tuning file that is unreadable or holds values the runtime cannot use."""


def _int(d: dict, key: str, lo: int, hi: int, where: str, default=None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise TuningError(f"{where}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


@dataclass(frozen=True)
class TuningEntry:
    n: int
    k_lifted: int
    dtype: str
    m_max: int
    backend: str
    alg_id: int = 0
    split_k: int = 1
    us: float | None = None          # measured time of what was chosen (microseconds)
    us_sparse: float | None = None
    us_dense: float | None = None
    config: str | None = None        # the CUTLASS configuration of a "cutlass" bucket

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TuningEntry":
        if not isinstance(d, dict):
            raise TuningError(f"{where} is not an object")
        known = {f for f in cls.__dataclass_fields__} | set(_LEGACY)
        if unknown := sorted(set(d) - known):
            raise TuningError(f"{where}: unknown key {unknown[0]!r}")
        dtype = d.get("dtype")
        if dtype not in DTYPES:
            raise TuningError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
        backend = d.get("backend")
        if backend not in BACKENDS:
            raise TuningError(f"{where}: 'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
        config = d.get("config")
        if backend == "cutlass":
            if not isinstance(config, str) or not 0 < len(config) <= MAX_CONFIG or not all(
                    c.isalnum() or c in "_:x" for c in config):
                raise TuningError(f"{where}: a cutlass bucket needs a 'config' name (letters, digits, '_', ':'), "
                                  f"got {config!r}")
        elif config is not None:
            raise TuningError(f"{where}: 'config' belongs to cutlass buckets, not {backend!r}")
        measured = {}
        for key in _MEASURED:
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                raise TuningError(f"{where}: {key!r} must be a non-negative number or null, got {v!r}")
            measured[key] = None if v is None else float(v)
        return cls(n=_int(d, "n", 1, MAX_M, where), k_lifted=_int(d, "k_lifted", 1, MAX_M, where), dtype=dtype,
                   m_max=_int(d, "m_max", 1, MAX_M, where), backend=backend,
                   alg_id=_int(d, "alg_id", 0, MAX_ALG_ID, where, 0),
                   split_k=_int(d, "split_k", 1, MAX_SPLIT_K, where, 1), config=config, **measured)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _MEASURED + ("config",)}


@dataclass(frozen=True)
class TuningTable:
    device: str | None = None                 # torch.cuda.get_device_name() of the tuning GPU
    library: str | None = None                # e.g. "cuSPARSELt 800 (torch 2.11.0+cu130)"
    policy: str | None = None                 # how the tuner chose the plans (objective, mixed-plan rule)
    tensor_parallel_size: int = 1
    entries: tuple[TuningEntry, ...] = ()
    version: int = TUNING_VERSION
    _by_shape: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        by_shape: dict[tuple, list[TuningEntry]] = {}
        for e in self.entries:
            by_shape.setdefault((e.n, e.k_lifted, e.dtype), []).append(e)
        for key, rows in by_shape.items():
            rows.sort(key=lambda e: e.m_max)
            bounds = [e.m_max for e in rows]
            if len(set(bounds)) != len(bounds):
                raise TuningError(f"tuning table: two entries for N={key[0]} K'={key[1]} {key[2]} "
                                  f"with the same m_max")
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "_by_shape", {k: tuple(v) for k, v in by_shape.items()})

    def shapes(self, dtype: str | None = None) -> list[tuple[int, int, str]]:
        """The (N, K', dtype) the table knows, sorted (of one dtype if given)."""
        return sorted(k for k in self._by_shape if dtype is None or k[2] == dtype)

    def buckets(self, n: int, k_lifted: int, dtype: str) -> tuple[TuningEntry, ...]:
        """One layer shape's entries, ascending m_max (empty if the shape was not tuned)."""
        return self._by_shape.get((n, k_lifted, dtype), ())

    @classmethod
    def from_dict(cls, d, where: str = "tuning file") -> "TuningTable":
        if not isinstance(d, dict):
            raise TuningError(f"{where} is not a JSON object")
        version = d.get("format_version")
        if version != TUNING_VERSION:
            raise TuningError(f"{where}: format_version {version!r} is not supported (this slidesparse reads "
                              f"{TUNING_VERSION}); re-run `slidesparse tune`")
        for key in ("device", "library", "policy"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise TuningError(f"{where}: {key!r} must be a string or null")
        tp = _int(d, "tensor_parallel_size", 1, 1024, where, 1)
        rows = d.get("entries")
        if not isinstance(rows, list):
            raise TuningError(f"{where} has no 'entries' list")
        entries = tuple(TuningEntry.from_dict(e, f"{where}: entry {i}") for i, e in enumerate(rows))
        try:
            return cls(device=d.get("device"), library=d.get("library"), policy=d.get("policy"),
                       tensor_parallel_size=tp, entries=entries)
        except TuningError as e:
            raise TuningError(f"{where}: {e}") from None

    def plan_summary(self, layer_counts: dict[tuple[int, int, str], int] | None = None) -> list[dict]:
        """What the table serves, per M bucket bound: how many layers run on each backend, and the
        time the tuner measured for the chosen plan against the dense one, summed over the layers.

        layer_counts: {(N, K', dtype): layers of that shape in the model} (count_layers); without
        it every shape counts once. A bucket bound takes, per shape, the entry the runtime would
        (the smallest m_max >= the bound). Where a counted shape has no measurement the bucket's
        times are None rather than a partial sum."""
        rows = []
        for bound in sorted({e.m_max for e in self.entries}):
            layers = {b: 0 for b in BACKENDS}
            us = dense = 0.0
            timed = True
            for key, entries in self._by_shape.items():
                count = 1 if layer_counts is None else layer_counts.get(key, 0)
                if not count:
                    continue
                e = next((x for x in entries if x.m_max >= bound), entries[-1])
                layers[e.backend] += count
                if e.us is None or e.us_dense is None:
                    timed = False
                else:
                    us += count * e.us
                    dense += count * e.us_dense
            rows.append({"m_max": bound, "layers": layers, "us": us if timed else None,
                         "us_dense": dense if timed else None,
                         "speedup": dense / us if timed and us > 0 else None})
        return rows

    def to_dict(self) -> dict:
        return {"format_version": self.version, "device": self.device, "library": self.library, "policy": self.policy,
                "tensor_parallel_size": self.tensor_parallel_size, "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TuningTable":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TuningError(f"cannot read tuning file {path}: {e}") from None
        return cls.from_dict(d, f"tuning file {path}")

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")


def count_layers(shapes: dict[str, tuple[int, int]], lifted_k, dtype: str) -> dict[tuple[int, int, str], int]:
    """{(N, K', dtype): count} of a model's vLLM layers ({name: (N, K)}, core.layout.vllm_layer_shapes),
    K' = lifted_k(K): the keys of a tuning table for that model."""
    counts: dict[tuple[int, int, str], int] = {}
    for n, k in shapes.values():
        key = (n, lifted_k(k), dtype)
        counts[key] = counts.get(key, 0) + 1
    return counts


# what each backend of a table is, in reports
BACKEND_NAMES = {"dense": "dense", "sparse": "cuSPARSELt", "cutlass": "SlideSparse CUTLASS"}


def plan_lines(summary: list[dict]) -> list[str]:
    """The plan summary as text: one line per M bucket, then what it means for a user."""
    lines = []
    for r in summary:
        kinds = ", ".join(f"{BACKEND_NAMES[b]} {c}" for b, c in r["layers"].items() if c)
        t = ("not measured" if r["speedup"] is None else
             f"{r['speedup']:.3f}x ({r['us'] / 1000:.3f} against {r['us_dense'] / 1000:.3f} ms dense)")
        lines.append(f"  M <= {r['m_max']}: {kinds}; the linear layers' speed-up over dense, as tuned: {t}")
    if summary and all(r["layers"]["dense"] == sum(r["layers"].values()) for r in summary):
        lines.append("  every layer runs the dense kernel at every M on this GPU: the checkpoint serves like the "
                     "dense model, with no speed-up")
    return lines
