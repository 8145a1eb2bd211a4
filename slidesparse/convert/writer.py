"""Streaming sharded safetensors writer, and the atomic output directory.

The tensors to write are planned up front (name, dtype, shape), which fixes every shard's header,
so each tensor goes to disk the moment it is produced and nothing is buffered: peak memory is
the tensor in hand. Shards are filled in plan order up to `max_shard_bytes`; within a shard,
offsets are laid out by element size (largest first) so every tensor is naturally aligned, and
the header is padded to 8 bytes, as the safetensors format recommends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvertError
from ..core.checkpoint import INDEX_NAME, TORCH_TO_ST
from ..core.errors import SlideSparseError


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


MAX_SHARDS = 99999  # model-NNNNN-of-NNNNN.safetensors


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
        if type(max_shard_bytes) is not int or max_shard_bytes < 1:
            raise ConvertError(f"the shard size must be a positive number of bytes, got {max_shard_bytes!r}")
        groups: list[list[Planned]] = [[]]
        size = 0
        for p in plan:
            if groups[-1] and not single_file and size + p.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.nbytes
        n = len(groups)
        if n > MAX_SHARDS:
            raise ConvertError(f"{n} output shards of at most {max_shard_bytes} bytes is more than the {MAX_SHARDS} "
                               "that shard names can number; use a larger --max-shard-gb")
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
    """The output folder `dest`, written as a temporary folder beside it and renamed onto it only
    when complete; on any failure (or signal that Python sees) the temporary folder is removed.

    Claiming: a lock file beside `dest` (flock, which the kernel releases when the process ends,
    even by kill -9) is held from __enter__ to __exit__, so a second run to the same destination
    fails at once. The temporary folder's name carries the owner's pid; any temporary folder of
    this tool for `dest` that a run finds while holding the lock was left by a dead run (kill -9,
    power loss) and is removed.

    A non-empty `dest` is refused unless overwrite=True. At the end the temporary folder is
    renamed onto `dest` with rename(2), which fails if something non-empty has appeared there
    meanwhile: the run then fails and leaves the newcomer alone. With overwrite=True, only the
    folder that was there when the run started is replaced (by one atomic exchange where the
    kernel and file system support it, else by two renames), and never something put there while
    the run was writing.
    """

    def __init__(self, dest: str | Path, overwrite: bool = False):
        self.dest = Path(os.path.realpath(dest))
        self.overwrite = overwrite
        tag = _tag(self.dest.name)
        self.lock_path = self.dest.parent / f".{tag}.slidesparse-lock"
        self._prefix = f".{tag}.slidesparse-"
        self._leftover = re.compile(re.escape(self._prefix) + r"(tmp|old)-[0-9]+-[0-9a-f]+")
        self._lock_fd: int | None = None
        self._existing: os.stat_result | None = None

    # -- claiming

    def __enter__(self) -> Path:
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConvertError(f"{self.dest}: cannot create the folder {parent} ({e.strerror or e})") from None
        self._lock_fd = _lock(self.lock_path, self.dest)
        try:
            self._remove_leftovers()
            self._check_dest()
            self.tmp = self._mkdir("tmp")
        except BaseException:
            self._unlock()
            raise
        return self.tmp

    def _check_dest(self) -> None:
        try:
            st = os.lstat(self.dest)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise ConvertError(f"{self.dest}: destination exists and is not a directory")
        try:
            empty = not any(os.scandir(self.dest))
        except OSError as e:
            raise ConvertError(f"{self.dest}: cannot read the destination ({e.strerror or e})") from None
        if not empty and not self.overwrite:
            raise ConvertError(f"{self.dest}: destination exists and is not empty (use --overwrite to replace it)")
        self._existing = st

    def _mkdir(self, kind: str) -> Path:
        for _ in range(100):
            p = self.dest.parent / f"{self._prefix}{kind}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(p)  # 0777 minus the umask: the output gets the permissions any new folder gets
                return p
            except FileExistsError:
                continue
            except OSError as e:
                raise ConvertError(f"{self.dest}: cannot create a folder in {self.dest.parent} "
                                   f"({e.strerror or e})") from None
        raise ConvertError(f"{self.dest}: cannot find a free temporary name in {self.dest.parent}")

    def _remove_leftovers(self) -> None:
        """Temporary folders of dead runs to this destination (we hold the lock, so no live run owns one)."""
        try:
            names = [e.name for e in os.scandir(self.dest.parent) if self._leftover.fullmatch(e.name)]
        except OSError:
            return
        olds = sorted(n for n in names if self._leftover.fullmatch(n).group(1) == "old")
        if olds and not os.path.lexists(self.dest):
            # a run died between its two renames (the fallback for file systems without an atomic
            # exchange): the folder it was replacing goes back in place
            os.rename(self.dest.parent / olds[-1], self.dest)
            names.remove(olds[-1])
        for n in names:
            shutil.rmtree(self.dest.parent / n, ignore_errors=True)

    # -- committing

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError) and not isinstance(exc, SlideSparseError):
                    raise ConvertError(f"{self.dest}: cannot write the output ({exc.strerror or exc}); "
                                       "nothing was written") from None
                return
            try:
                self._commit()
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        finally:
            self._unlock()

    def _commit(self) -> None:
        # data, then names: after a crash the destination is the old folder or the complete new one
        for e in os.scandir(self.tmp):
            if e.is_file(follow_symlinks=False):
                _fsync(e.path)
        _fsync(self.tmp)
        try:
            now = os.lstat(self.dest)
        except FileNotFoundError:
            now = None
        ours = (now is not None and self._existing is not None and self.overwrite
                and os.path.samestat(now, self._existing))
        try:
            if ours:
                self._replace()
            else:
                # fails (ENOTEMPTY, EEXIST, ENOTDIR) unless the destination is absent or an empty folder
                os.rename(self.tmp, self.dest)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise ConvertError(f"{self.dest}: something was put there while this run was writing; left it "
                                   "alone and discarded this run's output") from None
            raise ConvertError(f"{self.dest}: cannot move the output into place ({e.strerror or e})") from None
        _fsync(self.dest.parent)

    def _replace(self) -> None:
        if _exchange(self.tmp, self.dest):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the previous folder; a leftover if we die here
            return
        # two renames; a run that dies between them leaves the previous folder under an "old"
        # leftover name, which the next run puts back (_remove_leftovers)
        for _ in range(100):
            old = self.dest.parent / f"{self._prefix}old-{os.getpid()}-{secrets.token_hex(4)}"
            if not os.path.lexists(old):
                break
        os.rename(self.dest, old)
        try:
            os.rename(self.tmp, self.dest)
        except BaseException:
            os.rename(old, self.dest)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # unlink before unlocking: a run waiting on this inode then sees it is stale (see _lock)
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None


def write_model_files(folder: Path, config: dict, tokenizer, tokenizer_config: dict, special_tokens: dict,
                      generation_config: dict) -> None:
    """The JSON and tokenizer files beside the weights of a Hugging Face model folder."""
    def dump(name, obj):
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n")
    dump("config.json", config)
    tokenizer.save(str(folder / "tokenizer.json"))
    dump("tokenizer_config.json", tokenizer_config)
    dump("special_tokens_map.json", special_tokens)
    dump("generation_config.json", generation_config)


def check_apart(src: Path, dst: Path, as_given, what: str = "the source") -> None:
    """The destination must be neither the input `src` (a folder or a file), nor inside it, nor a
    folder that holds it: replacing an ancestor would delete the input (with --overwrite), and
    writing inside a source folder would modify an input. Compared by resolved path and, for
    paths that exist, by identity (a bind mount or a second name for the same folder)."""
    src, dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))

    def holds(a: Path, b: Path) -> bool:  # a is b or one of its ancestors
        if a == b or a in b.parents:
            return True
        try:
            sa = os.stat(a)
        except OSError:
            return False
        for p in (b, *b.parents):
            try:
                if os.path.samestat(sa, os.stat(p)):
                    return True
            except OSError:
                continue
        return False
    if holds(src, dst):
        raise ConvertError(f"{as_given}: the destination must not be {what} or inside it")
    if holds(dst, src):
        raise ConvertError(f"{as_given}: the destination holds {what} ({src}); replacing it would delete "
                           f"{what}: choose another destination")


def _tag(name: str) -> str:
    """The destination's name as used in the lock and temporary names (short enough for NAME_MAX)."""
    if len(name.encode()) <= 160:
        return name
    return name.encode()[:80].decode(errors="ignore") + "~" + hashlib.sha1(name.encode()).hexdigest()[:12]


def _lock(path: Path, dest: Path) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise ConvertError(f"{dest}: cannot create {path.name} in {path.parent} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConvertError(f"{dest}: another slidesparse run (pid {owner or '?'}) is writing this "
                                   "destination") from None
            raise ConvertError(f"{dest}: cannot lock {path} ({e.strerror or e})") from None
        # the previous owner may have unlinked the file between our open and our lock: then the
        # lock we hold is on a dead inode, and we start again on the path's current file
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise ConvertError(f"{dest}: cannot lock {path} (it keeps being replaced)")


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS):  # file systems that cannot sync directories
            raise
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
