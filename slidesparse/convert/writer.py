"""Streaming sharded safetensors writer, and the atomic output directory.

The tensors to write are planned up front (name, dtype, shape), which fixes every shard's header,
so each tensor goes to disk the moment it is produced and nothing is buffered: peak memory is
the tensor in hand. Shards are filled in plan order up to `max_shard_bytes`; within a shard,
offsets are laid out by element size (largest first) so every tensor is naturally aligned, and
the header is padded to 8 bytes, as the safetensors format recommends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvertError
from ..core.checkpoint import INDEX_NAME, TORCH_TO_ST


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class _Shard:
    def __init__(self, path: Path, items: list[Planned], metadata: dict[str, str]):
        self.path = path
        order = sorted(items, key=lambda p: (-p.itemsize, p.name))
        header: dict = {"__metadata__": metadata}
        off = 0
        self.offsets: dict[str, int] = {}
        for p in order:
            header[p.name] = {"dtype": TORCH_TO_ST[p.dtype], "shape": list(p.shape),
                              "data_offsets": [off, off + p.nbytes]}
            self.offsets[p.name] = off
            off += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + off
        self.pending = {p.name for p in items}
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.size)

    def write(self, name: str, t: torch.Tensor) -> None:
        self.f.seek(self.data_start + self.offsets[name])
        if t.numel():
            self.f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self.pending.discard(name)
        if not self.pending:
            self.f.close()


class ShardedWriter:
    """Write planned tensors into `model-0000i-of-0000n.safetensors` (+ index) under `out_dir`.

    single_file=True writes one `model.safetensors` and no index (what small HF models look like).
    """

    def __init__(self, out_dir: Path, plan: list[Planned], max_shard_bytes: int = 2 * 1024**3,
                 single_file: bool = False):
        self.out_dir = Path(out_dir)
        self.plan = {p.name: p for p in plan}
        if len(self.plan) != len(plan):
            raise ValueError("duplicate tensor names in the write plan")
        groups: list[list[Planned]] = [[]]
        size = 0
        for p in plan:
            if groups[-1] and not single_file and size + p.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.nbytes
        n = len(groups)
        self.single = single_file
        names = (["model.safetensors"] if single_file else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.groups = list(zip(names, groups))
        self.where = {p.name: i for i, (_, g) in enumerate(self.groups) for p in g}
        self.shards: dict[int, _Shard] = {}
        self.total = sum(p.nbytes for p in plan)

    def write(self, name: str, t: torch.Tensor) -> None:
        p = self.plan.get(name)
        if p is None:
            raise RuntimeError(f"tensor {name!r} was not planned")
        if t.dtype != p.dtype or tuple(t.shape) != p.shape:
            raise RuntimeError(f"tensor {name!r}: planned {p.dtype} {p.shape}, got {t.dtype} {tuple(t.shape)}")
        i = self.where[name]
        sh = self.shards.get(i)
        if sh is None:
            fname, items = self.groups[i]
            sh = self.shards[i] = _Shard(self.out_dir / fname, items, {"format": "pt"})
        sh.write(name, t.cpu())

    def close(self) -> list[str]:
        missing = [n for n in self.plan if self.where[n] not in self.shards or n in self.shards[self.where[n]].pending]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        if not self.single:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.groups[self.where[n]][0] for n in sorted(self.plan)}}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [f for f, _ in self.groups]

    def abort(self) -> None:
        for sh in self.shards.values():
            if not sh.f.closed:
                sh.f.close()


class AtomicDir:
    """A temporary directory next to `dest`, renamed onto it on success and removed on failure.

    Refuses a non-empty `dest` unless overwrite=True (then the old directory is replaced only
    after the new one is complete).
    """

    def __init__(self, dest: str | Path, overwrite: bool = False):
        self.dest = Path(dest)
        self.overwrite = overwrite
        if self.dest.exists():
            if not self.dest.is_dir():
                raise ConvertError(f"{self.dest}: destination exists and is not a directory")
            if any(self.dest.iterdir()) and not overwrite:
                raise ConvertError(f"{self.dest}: destination exists and is not empty (use --overwrite to replace it)")

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it 0700
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.rename(self.dest, old)
            os.rename(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dest)
