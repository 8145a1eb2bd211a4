"""The checkpoint reader (core/checkpoint.py): it opens only regular files inside the model folder,
and validates every safetensors header before a tensor is read."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from slidesparse.core.checkpoint import Checkpoint, CheckpointError, first_nonfinite, load_layer

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _folder(tmp_path, name="m", tensors=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tensors = tensors or {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)}
    save_file(tensors, str(d / "model.safetensors"))
    return d, tensors


def _raw_file(path, header: dict, data: bytes, header_bytes: bytes | None = None):
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_reads_what_safetensors_wrote(tmp_path):
    d, t = _folder(tmp_path)
    ck = Checkpoint(d)
    assert set(ck.tensors) == set(t)
    for k, v in t.items():
        assert ck.tensors[k].dtype == v.dtype and torch.equal(ck.get(k), v)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/ABS", "sub/../../outside.safetensors", "..", "",
                                   "a\0b", 5, None, ["model.safetensors"]])
def test_index_entries_must_be_file_names_in_the_folder(tmp_path, entry):
    d, t = _folder(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / "model.safetensors", outside)
    entry = str(outside) if entry == "/ABS" else entry
    wm = {k: "model.safetensors" for k in t}
    wm["b"] = entry
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    opened = []
    hook_on = threading.Event()
    hook_on.set()

    def hook(event, args):
        if hook_on.is_set() and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(hook)  # audit hooks cannot be removed; the event switches this one off
    try:
        with pytest.raises(CheckpointError) as e:
            Checkpoint(d)
    finally:
        hook_on.clear()
    assert "\n" not in str(e.value)
    assert not any(os.path.realpath(p) == str(outside.resolve()) for p in opened), opened


def test_symlinks_must_stay_inside_the_folder_but_the_hf_cache_layout_is_fine(tmp_path):
    d, t = _folder(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(d)
    # a symlink to a file inside the folder is the folder's own file
    os.replace(outside, d / "real.bin")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("real.bin")
    assert torch.equal(Checkpoint(d).get("a"), t["a"])
    # the Hugging Face hub cache: snapshots/<rev>/* are symlinks into the repository's blobs/
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name in ("config.json", "real.bin"):
        os.replace(d / name, repo / "blobs" / name)
    (snap / "config.json").symlink_to("../../blobs/config.json")
    (snap / "model.safetensors").symlink_to("../../blobs/real.bin")
    assert torch.equal(Checkpoint(snap).get("a"), t["a"])
    # ... but not into another repository's blobs
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    os.replace(repo / "blobs" / "real.bin", other / "real.bin")
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(other / "real.bin")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(snap)


def test_optional_files_are_confined_too(tmp_path):
    d, _ = _folder(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    ck = Checkpoint(d)
    assert ck.file("tokenizer.json") is None
    (d / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        ck.file("tokenizer.json")
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        ck.file("tokenizer.json")


def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    # in a subprocess with a timeout: a reader that opened the FIFO would block forever
    d, _ = _folder(tmp_path)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    code = ("import sys; from slidesparse.core.checkpoint import Checkpoint, CheckpointError\n"
            "try:\n    Checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "not a regular file" in p.stdout, p.stdout + p.stderr


def _header_case(tmp_path, entries: dict, data_len: int, header_bytes: bytes | None = None):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    _raw_file(d / "model.safetensors", entries, os.urandom(data_len), header_bytes)
    return d


@pytest.mark.parametrize("entries,data_len,words", [
    ({"t": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, 16, "non-negative"),
    ({"t": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, 16, "expected"),
    ({"t": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "non-negative integers"),
    ({"t": {"dtype": "F32", "shape": [1.0, 4], "data_offsets": [0, 16]}}, 16, "non-negative integers"),
    ({"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}, 16, "non-negative integers"),
    ({"t": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, 4, "at most 8"),
    ({"t": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}}, 16, "dtype 'Q4_K'"),
    ({"t": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, 16, "dtype"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, 16, "begin <= end"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, 16, "data_offsets"),
    ({"t": {"dtype": "F32", "shape": [4]}}, 16, "needs dtype, shape and data_offsets"),
    ({"t": [1, 2]}, 16, "needs dtype"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "u": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "overlap"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "u": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}, 32, "a gap"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 20, "unindexed bytes"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 12, "truncated"),
    ({"__metadata__": [1], "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, "__metadata__"),
])
def test_damaged_headers_fail_with_one_line_naming_the_file(tmp_path, entries, data_len, words):
    d = _header_case(tmp_path, entries, data_len)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("raw,words", [
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [0, 4]}}', "duplicate key"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
])
def test_header_json_that_is_not_a_plain_object(tmp_path, raw, words):
    d = _header_case(tmp_path, {}, 4, header_bytes=raw)
    with pytest.raises(CheckpointError, match=words):
        Checkpoint(d)


def test_config_json_is_bounded_and_must_be_an_object(tmp_path):
    d, _ = _folder(tmp_path)
    for raw, words in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"[]", "not a JSON object"),
                       (b"{", "not valid JSON")):
        (d / "config.json").write_bytes(raw)
        with pytest.raises(CheckpointError, match=words):
            Checkpoint(d)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpoint(d)


def test_a_tensor_larger_than_memory_is_refused_before_allocating(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    n = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + (1 << 30)
    h = json.dumps({"t": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + n)  # sparse: no disk space used
    ck = Checkpoint(d)
    with pytest.raises(CheckpointError, match="more than this machine's"):
        ck.get("t")


def test_first_nonfinite_finds_the_first_bad_value_in_every_float_dtype():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.randn(37, 29, generator=g).to(dt)
        assert first_nonfinite(t) is None
        r, c = int(torch.randint(37, (1,), generator=g)), int(torch.randint(29, (1,), generator=g))
        t32 = t.float()
        t32[r, c] = float("nan")
        if r + 1 < 37:
            t32[r + 1, 0] = float("inf")
        bad = t32.to(dt)
        assert first_nonfinite(bad) == (r, c), dt
        assert first_nonfinite(bad, step=7) == (r, c), dt  # found across slice boundaries too
    assert first_nonfinite(torch.tensor([1, 2], dtype=torch.int8)) is None


def test_load_layer_checks_dtypes_before_reading(tiny, tmp_path):
    from slidesparse.convert import convert
    out = tmp_path / "c"
    convert(tiny["tiny-llama"], out, sparsity="2_8", dtype="int8")
    m = "model.layers.0.mlp.up_proj"
    assert load_layer(out, m)["shape"] == (288, 96)
    # the same 16 bytes relabelled as F64 [2]: a valid file, a wrong dtype for weight_shape
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    f = out / idx[f"{m}.weight_shape"]
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    h[f"{m}.weight_shape"]["dtype"] = "F64"  # same size as I64
    hb = json.dumps(h, separators=(",", ":")).encode()
    assert len(hb) <= n
    raw[8:8 + n] = hb + b" " * (n - len(hb))
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="weight_shape is F64, expected I64"):
        load_layer(out, m)
