"""Fuzzing what a checkpoint folder may hold (hypothesis): generated safetensors headers, index files
and config.json values must end in a result or in a SlideSparseError with a one-line message, never
in another exception; nothing may open a file outside the model folder (a canary file beside it, and
a symlink to it inside, must never be opened), and nothing may be written but the destination.

Every open() of the process is seen through an audit hook (sys.addaudithook), so a read that the
code under test did not mean to make is caught too, not only the ones it reports."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from slidesparse.convert import convert
from slidesparse.convert.verify import verify
from slidesparse.core.checkpoint import Checkpoint
from slidesparse.core.errors import SlideSparseError
from slidesparse.core.layout import model_tensors
from slidesparse.core.presets import PRESETS

# SLIDESPARSE_FUZZ_EXAMPLES=1500 for a longer search than CI's 100 examples per test (about 1 minute)
FUZZ = settings(max_examples=int(os.environ.get("SLIDESPARSE_FUZZ_EXAMPLES", 100)), deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# one layer of 32 wide: a conversion takes a few milliseconds, so the examples are cheap
CONFIG = dict(PRESETS["tiny-llama"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)

# ----------------------------------------------------------------------------- watching open()

_opened: list[tuple[str, bool]] = []  # (path, for writing)
_watching = [False]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event, args):
    if not _watching[0] or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
        isinstance(flags, int) and flags & _WRITE_FLAGS)
    _opened.append((os.fsdecode(args[0]), write))


sys.addaudithook(_audit)  # cannot be removed; it records only while _watching[0] is set

_PYTHON_DIRS = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                    Path(__file__).resolve().parents[1] / "slidesparse")})


def _inside(path: str, folder: Path) -> bool:
    r, f = os.path.realpath(path), os.path.realpath(folder)
    return r == f or r.startswith(f + os.sep)


def _run_watched(fn, models, dst: Path | None, canary: Path):
    """Run fn(); return its result, or None if it raised a SlideSparseError (one line). Checks every
    open() it made: reads inside the model folders (or Python's own files, or /proc, /sys and /dev
    for the CPU's description), writes only the destination and its claim beside it."""
    models = (models,) if isinstance(models, Path) else models
    _opened.clear()
    _watching[0] = True
    try:
        out = fn()
    except SlideSparseError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        out = None
    finally:
        _watching[0] = False
    for path, write in _opened:
        assert os.path.realpath(path) != os.path.realpath(canary), ("opened the canary", path)
        # the destination, its lock and temporary folder beside it, and the folder itself (fsync)
        claim = dst is not None and _inside(path, dst.parent) and (
            _inside(path, dst) or os.path.realpath(path) == os.path.realpath(dst.parent)
            or ".slidesparse-" in os.path.relpath(os.path.realpath(path), dst.parent.resolve()))
        if write:
            assert claim, ("wrote outside the destination", path)
        else:
            assert (claim or any(_inside(path, m) for m in models)
                    or os.path.realpath(path).startswith(("/proc/", "/sys/", "/dev/"))
                    or any(_inside(path, p) for p in _PYTHON_DIRS)), ("read outside the model folder", path)
    return out


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- the model and its variants

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "model"
    d.mkdir()
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    save_file({n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in model_tensors(CONFIG)},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(CONFIG))
    convert(d, d.parent / "warm", sparsity="2_8", dtype="int8")  # imports and one-time setup, unwatched
    verify(d.parent / "warm", source=d)
    return d


class _Case:
    """A scratch folder: model/ (a copy of the base), a canary beside it, out/ as the destination."""

    def __init__(self, base: Path):
        self.root = Path(tempfile.mkdtemp(prefix="fuzz-"))
        self.model = self.root / "model"
        shutil.copytree(base, self.model)
        self.canary = self.root / "canary.safetensors"
        shutil.copy(base / "model.safetensors", self.canary)  # a valid file: reading it would "work"
        self.dst = self.root / "out"

    def convert(self, **kw):
        before = _snapshot(self.root)
        out = _run_watched(lambda: convert(self.model, self.dst, **{"sparsity": "2_8", "dtype": "int8", **kw}),
                           self.model, self.dst, self.canary)
        after = _snapshot(self.root)
        created = {k: v for k, v in after.items() if k not in before}
        assert {k: v for k, v in after.items() if k in before} == before  # inputs and all else untouched
        assert not before.keys() - after.keys()
        if out is None:
            assert not created, created
        else:
            assert created and all(k == "out" or k.startswith("out/") for k in created), created
            # a conversion that succeeded is a correct one
            assert _run_watched(lambda: verify(self.dst, source=self.model), (self.dst, self.model), None,
                                self.canary) is not None
        return out

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


json_leaf = (st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
             | st.integers(min_value=-2**70, max_value=2**70)
             | st.sampled_from([0, -1, 1, 2, 16, 32, 64, 96, 2**31, 2**63, 10**9, "F32", "BF16", "I8", "U8"]))
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=8)


def _read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


header_edit = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values),
    st.tuples(st.just("shape_dim"), st.integers(0, 1), st.integers(-2**65, 2**65)),
    # edits that keep the byte count right, so only a check of their meaning can catch them
    st.tuples(st.just("negate_dims"), st.none(), st.none()),
    st.tuples(st.just("dtype_same_size"), st.sampled_from(["F16", "BF16", "I16", "U8", "I8", "BOOL", "F8_E4M3",
                                                           "F8_E5M2", "F32", "I32", "I64", "F64"]), st.none()),
    st.tuples(st.just("overlap"), st.integers(1, 10**6), st.none()),
    st.tuples(st.just("offset"), st.integers(0, 1), st.integers(-2**65, 2**65)),
    st.tuples(st.just("drop_key"), st.sampled_from(["dtype", "shape", "data_offsets"]), st.none()),
    st.tuples(st.just("entry"), json_values, st.none()),
    st.tuples(st.just("add"), st.text(max_size=30), json_values),
    st.tuples(st.just("metadata"), json_values, st.none()),
    st.tuples(st.just("whole"), json_values, st.none()),
)


@FUZZ
@given(edits=st.lists(header_edit, min_size=1, max_size=3), tensor=st.integers(0, 10**6),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), data=st.one_of(st.none(), st.binary(max_size=64)),
       cut=st.integers(0, 64))
def test_generated_safetensors_headers(base, edits, tensor, length, data, cut):
    case = _Case(base)
    try:
        f = case.model / "model.safetensors"
        header, body = _read_st(f)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[tensor % len(names)]
        for op, a, b in edits:
            e = header.get(name) if isinstance(header, dict) else None
            if op == "field" and isinstance(e, dict):
                e[a] = b
            elif op == "shape_dim" and isinstance(e, dict) and isinstance(e.get("shape"), list) and e["shape"]:
                e["shape"][a % len(e["shape"])] = b
            elif op == "negate_dims" and isinstance(e, dict) and isinstance(e.get("shape"), list):
                e["shape"] = [-d if isinstance(d, int) else d for d in e["shape"]] + ([-1] if len(e["shape"]) % 2 else [])
            elif op == "dtype_same_size" and isinstance(e, dict):
                size = {"F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                        "F32": 4, "I32": 4, "I64": 8, "F64": 8}
                if isinstance(e.get("dtype"), str) and size.get(e["dtype"]) == size[a]:  # an earlier edit may have made it a list
                    e["dtype"] = a
            elif op == "overlap" and isinstance(e, dict) and isinstance(header, dict):
                other = header.get(names[(tensor + a) % len(names)])
                if isinstance(other, dict) and other is not e:
                    e["data_offsets"], other["data_offsets"] = other.get("data_offsets"), e.get("data_offsets")
            elif op == "offset" and isinstance(e, dict) and isinstance(e.get("data_offsets"), list):
                e["data_offsets"][a % len(e["data_offsets"])] = b
            elif op == "drop_key" and isinstance(e, dict):
                e.pop(a, None)
            elif op == "entry" and isinstance(header, dict):
                header[name] = a
            elif op == "add" and isinstance(header, dict):
                header[a] = b
            elif op == "metadata" and isinstance(header, dict):
                header["__metadata__"] = a
            elif op == "whole":
                header = a
        raw = json.dumps(header).encode()
        body = body[:len(body) - cut] + (data or b"")
        f.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
        _run_watched(lambda: Checkpoint(case.model), case.model, None, case.canary)
        case.convert()
    finally:
        case.close()


weight_map_entry = st.one_of(
    st.just("model.safetensors"),
    st.sampled_from(["../canary.safetensors", "CANARY", "link.safetensors", "sub/model.safetensors",
                     "model.safetensors/..", ".", "..", "", "./model.safetensors", "model.safetensors\0x",
                     "missing.safetensors", "config.json"]),
    st.text(max_size=20), json_values)


@FUZZ
@given(entries=st.dictionaries(st.integers(0, 10**6), weight_map_entry, max_size=3),
       extra=st.dictionaries(st.text(max_size=12), weight_map_entry, max_size=2),
       whole=st.one_of(st.none(), json_values), wm_whole=st.one_of(st.none(), json_values),
       link=st.booleans(), tokenizer_link=st.booleans())
def test_generated_index_files(base, entries, extra, whole, wm_whole, link, tokenizer_link):
    case = _Case(base)
    try:
        header, _ = _read_st(case.model / "model.safetensors")
        names = sorted(k for k in header if k != "__metadata__")
        wm = {n: "model.safetensors" for n in names}
        for i, v in entries.items():
            wm[names[i % len(names)]] = str(case.canary) if v == "CANARY" else v
        wm.update(extra)
        index = {"metadata": {"total_size": 1}, "weight_map": wm if wm_whole is None else wm_whole}
        if link:  # a symlink inside the folder to the file outside it
            (case.model / "link.safetensors").symlink_to(case.canary)
        if tokenizer_link:
            (case.model / "tokenizer.json").symlink_to(case.canary)
        (case.model / "model.safetensors.index.json").write_text(json.dumps(index if whole is None else whole))
        case.convert()
    finally:
        case.close()


CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
               "quantization_config", "torch_dtype"]
quantization_configs = st.fixed_dictionaries(
    {"quant_method": st.sampled_from(["compressed-tensors", "slidesparse", "bitnet", "fp8", ""]) | json_values},
    optional={"format": st.sampled_from(["int-quantized", "float-quantized"]) | json_values,
              "config_groups": st.dictionaries(st.text(max_size=4), json_values, max_size=2) | json_values,
              "sparsity_config": json_values, "ignore": json_values})


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | quantization_configs
                               | st.sampled_from(["DELETE", ["LlamaForCausalLM"], ["Qwen2ForCausalLM"],
                                                  ["BitNetForCausalLM"], 16, 32, 1, 2, 64, True, False]),
                               min_size=1, max_size=4),
       whole=st.one_of(st.none(), json_values))
def test_generated_config_values(base, changes, whole):
    case = _Case(base)
    try:
        cfg = dict(CONFIG)
        for k, v in changes.items():
            if v == "DELETE":
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (case.model / "config.json").write_text(json.dumps(cfg if whole is None else whole))
        case.convert()
    finally:
        case.close()


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS + ["slidesparse_export"]), json_values, max_size=3),
       qc_changes=st.dictionaries(st.sampled_from(["sparsity", "L", "weight_dtype", "activation_dtype", "ignore",
                                                   "format_version", "weight_scheme", "source", "quant_method"]),
                                  json_values | st.sampled_from(["2_6", "2_8", "int8", "fp8", "bf16", 1, None]),
                                  max_size=3),
       header_edits=st.lists(header_edit, max_size=2), tensor=st.integers(0, 10**6))
def test_generated_converted_checkpoints_in_verify(base, changes, qc_changes, header_edits, tensor):
    # verify and inspect read converted checkpoints, which are input to them like any other
    from slidesparse.convert.inspect import inspect_checkpoint
    case = _Case(base)
    try:
        ck = case.root / "ck"
        shutil.copytree(base.parent / "warm", ck)
        cfg = json.loads((ck / "config.json").read_text())
        cfg["quantization_config"].update(qc_changes)
        cfg.update(changes)
        (ck / "config.json").write_text(json.dumps(cfg))
        shard = sorted(ck.glob("model-*.safetensors"))[0]
        header, body = _read_st(shard)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[tensor % len(names)]
        for op, a, b in header_edits:
            e = header.get(name)
            if op == "field" and isinstance(e, dict):
                e[a] = b
            elif op == "shape_dim" and isinstance(e, dict) and isinstance(e.get("shape"), list) and e["shape"]:
                e["shape"][a % len(e["shape"])] = b
            elif op == "add":
                header[a] = b
        raw = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        before = _snapshot(case.root)
        for fn in (lambda: verify(ck), lambda: verify(ck, source=case.model), lambda: inspect_checkpoint(ck)):
            _run_watched(fn, (ck, case.model), None, case.canary)
        assert _snapshot(case.root) == before
    finally:
        case.close()
