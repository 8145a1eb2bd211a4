"""Bad input to the CLI ends in one line `error: ...` and exit code 2 (verify failures: exit 1); signals
end a run with one line and 128 + the signal number, leaving nothing behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slidesparse.cli import app
from slidesparse.convert import make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("err") / "tiny-llama"
    make_model("tiny-llama", d, seed=1)
    return d


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, (r.stdout or "") + (r.stderr or "")


def one_line_error(code, out, *words):
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for w in words:
        assert w in lines[0], (w, lines[0])


def copy(model, tmp_path, name="src"):
    d = tmp_path / name
    shutil.copytree(model, d)
    return d


def test_no_config_json(model, tmp_path):
    src = copy(model, tmp_path)
    (src / "config.json").unlink()
    one_line_error(*run("convert", src, tmp_path / "out"), "config.json")


def test_not_a_directory(tmp_path):
    one_line_error(*run("convert", tmp_path / "nope", tmp_path / "out"), "no such checkpoint")


def test_unknown_architecture(model, tmp_path):
    src = copy(model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run("convert", src, tmp_path / "out"), "unsupported architecture", "GPT2LMHeadModel")


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "bad_json", "tiny_file", "huge_header"])
def test_truncated_or_corrupt_safetensors(model, tmp_path, damage):
    src = copy(model, tmp_path)
    f = src / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    raw = {"truncate_data": raw[:-100], "truncate_header": raw[: 8 + n // 2], "tiny_file": raw[:5],
           "bad_json": raw[:8] + b"{" * n + raw[8 + n:],
           "huge_header": (2**40).to_bytes(8, "little") + raw[8:]}[damage]
    f.write_bytes(raw)
    one_line_error(*run("convert", src, tmp_path / "out"), "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_missing_shard_of_an_index(tmp_path):
    src = tmp_path / "sharded"
    make_model("tiny-llama", src, seed=1, max_shard_bytes=100_000)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    one_line_error(*run("convert", src, tmp_path / "out"), victim.name)


@pytest.mark.parametrize("key,value,words", [
    ("hidden_size", 128, ["shape", "hidden"]),
    ("intermediate_size", 256, ["_proj.weight has shape [", "(hidden, intermediate"]),
    ("num_attention_heads", 2, ["self_attn.", "has shape"]),
    ("num_key_value_heads", 3, ["k_proj", "shape"]),
    ("head_dim", 16, ["self_attn.", "has shape"]),
    ("num_hidden_layers", 1, ["model.layers.1", "num_hidden_layers"]),
    ("num_hidden_layers", 3, ["missing", "model.layers.2"]),
])
def test_shapes_that_do_not_match_the_architecture(model, tmp_path, key, value, words):
    src = copy(model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run("convert", src, tmp_path / "out"), *words)


def test_destination_exists(model, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    one_line_error(*run("convert", model, dst), "not empty", "--overwrite")
    assert (dst / "keep.txt").read_text() == "mine"
    code, out = run("convert", model, dst, "--overwrite")
    assert code == 0, out
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("spec", ["2_5", "3:8", "2_x", "1_8", "4"])
def test_bad_sparsity_spec(model, tmp_path, spec):
    one_line_error(*run("convert", model, tmp_path / "out", "--sparsity", spec), "bad sparsity spec")


def test_bad_dtype_format_and_option_combinations(model, tmp_path):
    one_line_error(*run("convert", model, tmp_path / "o1", "--dtype", "fp4"), "unknown dtype")
    one_line_error(*run("convert", model, tmp_path / "o2", "--sparsity", "none"), "--format compressed-tensors")
    one_line_error(*run("convert", model, tmp_path / "o3", "--format", "gguf"), "--format")
    one_line_error(*run("convert", model, tmp_path / "o4", "--ignore", "model.layers.0.self_attn.q_proj"),
                   "k_proj", "fuses")
    one_line_error(*run("convert", model, model / "inner"), "inside")


def test_bitnet_needs_a_quantized_dtype(tmp_path):
    src = tmp_path / "bitnet"
    make_model("tiny-bitnet", src, seed=1)
    one_line_error(*run("convert", src, tmp_path / "out", "--dtype", "bf16"), "ternary")


def test_unknown_preset_and_not_converted(model, tmp_path):
    one_line_error(*run("make-model", "--preset", "gpt-5", "--out", tmp_path / "m"), "unknown preset")
    one_line_error(*run("inspect", model), "not a converted checkpoint")
    one_line_error(*run("verify", model), "not a converted checkpoint")


def test_cli_happy_path_and_verify_exit_code(model, tmp_path):
    dst = tmp_path / "out"
    code, out = run("convert", model, dst, "--sparsity", "2_8", "--dtype", "fp8")
    assert code == 0 and "converted 14 layers" in out, out
    code, out = run("inspect", dst, "--json")
    assert code == 0, out
    rep = json.loads(out)
    assert len(rep["layers"]) == 14 and all(x["pattern"] == "2_8" and x["dtype"] == "fp8_e4m3" for x in rep["layers"])
    assert all(x["bytes"] < x["dense_bytes"] for x in rep["layers"])
    code, out = run("inspect", dst)
    assert code == 0 and "layers.0.self_attn.q_proj" in out and "not tuned" in out
    assert rep["tuning"] is None
    # a tuning table (as `slidesparse tune` writes it on a GPU): inspect says what it serves
    from slidesparse.core.layout import vllm_layer_shapes
    from slidesparse.core.pattern import parse_pattern
    from slidesparse.core.tuning import TuningEntry, TuningTable
    shapes = set(vllm_layer_shapes({x["name"]: tuple(x["shape"]) for x in rep["layers"]},
                                   json.loads((dst / "config.json").read_text())).values())
    lift = parse_pattern("2_8").lifted_k
    entries = [TuningEntry(n=n, k_lifted=lift(k), dtype="fp8_e4m3", m_max=m, backend="dense", us=10.0 * m, us_dense=10.0 * m)
               for n, k in shapes for m in (64, 16384)]
    TuningTable(device="NVIDIA H200", library="test", entries=tuple(entries)).save(dst / "slidesparse_tuning.json")
    code, out = run("inspect", dst, "--json")
    tun = json.loads(out)["tuning"]
    assert code == 0 and tun["device"] == "NVIDIA H200" and [r["m_max"] for r in tun["plan"]] == [64, 16384]
    # 14 projections: per decoder layer qkv, o, gate_up, down (q/k/v and gate/up fused as vLLM builds them)
    assert all(sum(r["layers"].values()) == 8 and r["layers"]["dense"] == 8 for r in tun["plan"])
    code, out = run("inspect", dst)
    assert code == 0 and "tuned on NVIDIA H200" in out and "serves like the dense model" in out
    code, out = run("verify", dst, "--source", model)
    assert code == 0 and "14 layers verified against the source" in out
    other = tmp_path / "other"
    make_model("tiny-llama", other, seed=2)
    code, out = run("verify", dst, "--source", other)
    assert code == 1 and out.startswith("error: ") and "differs" in out, out


# ----------------------------------------------------------------------------- issue 11: reliability

def _cfg(src, **kw):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(kw)
    (src / "config.json").write_text(json.dumps(cfg))


def test_overwrite_onto_a_folder_that_holds_the_source_is_refused(tmp_path):
    # the reproduction: make-model into x/anc/src, then convert x/anc/src x/anc --overwrite
    anc = tmp_path / "x" / "anc"
    code, out = run("make-model", "--preset", "tiny-llama", "--out", anc / "src")
    assert code == 0, out
    (anc / "notes.txt").write_text("mine")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for dst in (anc, tmp_path / "x", tmp_path):
        for extra in ((), ("--overwrite",)):
            one_line_error(*run("convert", anc / "src", dst, "--sparsity", "2_8", "--dtype", "int8", *extra),
                           "holds the source")
    (tmp_path / "alias").symlink_to(anc)  # the same folder under another name
    one_line_error(*run("convert", anc / "src", tmp_path / "alias", "--overwrite"), "holds the source")
    one_line_error(*run("convert", anc / "src", tmp_path / "alias" / "src", "--overwrite"), "must not be the source")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("args,words", [
    (["convert"], ["Missing argument"]),
    (["convert", "a", "b", "--threads", "x"], ["--threads"]),
    (["convert", "a", "b", "--bogus"], ["--bogus"]),
    (["verify"], ["Missing argument"]),
    (["make-model", "--out", "x"], ["--preset"]),
])
def test_usage_errors_are_one_line(args, words):
    one_line_error(*run(*args), *words)


@pytest.mark.parametrize("opt,value,words", [
    ("--threads", "100000", ["--threads", "between 1 and"]),
    ("--threads", "-1", ["--threads"]),
    ("--threads", "0", ["--threads"]),
    ("--max-shard-gb", "nan", ["--max-shard-gb"]),
    ("--max-shard-gb", "inf", ["--max-shard-gb"]),
    ("--max-shard-gb", "-1", ["--max-shard-gb"]),
    ("--sparsity", "2_10000000", ["maximum 64"]),
    ("--sparsity", "2_300", ["maximum 64"]),
    ("--sparsity", "2_" + "9" * 5000, ["bad sparsity spec"]),
])
def test_bad_option_values(model, tmp_path, opt, value, words):
    one_line_error(*run("convert", model, tmp_path / "out", opt, value), *words)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_make_model_options(tmp_path):
    one_line_error(*run("make-model", "--preset", "tiny-llama", "--out", tmp_path / "m", "--max-shard-gb", "nan"),
                   "--max-shard-gb")


@pytest.mark.parametrize("key,value,words", [
    ("architectures", 5, ["'architectures' must be a list"]),
    ("architectures", "LlamaForCausalLM", ["'architectures' must be a list"]),
    ("architectures", [["LlamaForCausalLM"]], ["'architectures' must be a list"]),
    ("quantization_config", "compressed-tensors", ["quantization_config is str"]),
    ("quantization_config", ["a"], ["quantization_config is list"]),
    ("quantization_config", {"quant_method": "compressed-tensors", "config_groups": []}, ["config_groups"]),
    ("num_hidden_layers", 1_000_000_000, ["num_hidden_layers", "[1, 4096]"]),
    ("num_hidden_layers", 4000, ["num_hidden_layers=4000", "model.layers.2 is missing"]),
    ("num_hidden_layers", True, ["num_hidden_layers"]),
    ("hidden_size", 96.0, ["hidden_size"]),
    ("head_dim", "32", ["head_dim"]),
    ("num_key_value_heads", 2, ["multiple of num_key_value_heads"]),
    ("tie_word_embeddings", "false", ["tie_word_embeddings"]),
])
def test_config_values_of_the_wrong_type_or_size(model, tmp_path, key, value, words):
    src = copy(model, tmp_path)
    _cfg(src, **{key: value})
    one_line_error(*run("convert", src, tmp_path / "out"), *words)


def test_header_with_a_negative_dimension(model, tmp_path):
    src = copy(model, tmp_path)
    f = src / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    h["model.norm.weight"]["shape"] = [-1, -96]  # -1 x -96 = 96 elements: the byte count still fits
    hb = json.dumps(h, separators=(",", ":")).encode()
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    one_line_error(*run("convert", src, tmp_path / "out"), "model.norm.weight", "non-negative")


def test_index_entry_outside_the_folder_is_never_opened(model, tmp_path):
    src = copy(model, tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x05" * 64)
    names = json.loads((src / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (src / "model.safetensors").read_bytes()[:8], "little")])
    wm = {k: "model.safetensors" for k in names if k != "__metadata__"}
    for bad in ("../secret.bin", str(secret)):
        wm["model.norm.weight"] = bad
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        code, out = run("convert", src, tmp_path / "out")
        one_line_error(code, out, "not a file name in the model folder")
        assert str(int.from_bytes(b"\x05" * 8, "little")) not in out  # the old error printed the bytes


def test_fifo_as_the_weights_file_does_not_hang(model, tmp_path):
    src = copy(model, tmp_path)
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    p = subprocess.run([sys.executable, "-m", "slidesparse.cli", "convert", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    one_line_error(p.returncode, p.stdout + p.stderr, "not a regular file")


def test_verify_against_a_source_of_another_architecture(tiny, tmp_path):
    dst = tmp_path / "out"
    code, out = run("convert", tiny["tiny-llama"], dst, "--dtype", "int8")
    assert code == 0, out
    code, out = run("verify", dst, "--source", tiny["tiny-qwen2"])
    assert code == 1 and len(out.splitlines()) == 1 and out.startswith("error: ") and "Qwen2ForCausalLM" in out, out


def test_read_only_destination_parent(model, tmp_path):
    if os.geteuid() == 0:
        parent = Path("/sys/kernel")  # root ignores permission bits; sysfs refuses new files even to root
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    try:
        one_line_error(*run("convert", model, parent / "out"), "Permission denied")
        one_line_error(*run("make-model", "--preset", "tiny-llama", "--out", parent / "out"), "Permission denied")
    finally:
        if parent != Path("/sys/kernel"):
            parent.chmod(0o755)
    assert not (parent / "out").exists()


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slidesparse.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".slidesparse-" in p.name)


def test_disk_full_while_writing(mid_model, tmp_path):
    # a file size limit makes the kernel fail the writes (EFBIG) the way a full disk does (ENOSPC)
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = _cli("convert", mid_model, tmp_path / "out", "--dtype", "int8", "--threads", "1", preexec_fn=limit)
    out, err = p.communicate(timeout=300)
    one_line_error(p.returncode, out + err, "cannot write the output", "File too large")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A Llama of 16M parameters: converting it takes long enough (about a second) to catch a run
    in the middle of writing."""
    from safetensors.torch import save_file
    from slidesparse.core.layout import model_tensors
    from slidesparse.core.presets import PRESETS
    d = tmp_path_factory.mktemp("mid") / "mid-llama"
    d.mkdir()
    cfg = dict(PRESETS["tiny-llama"], hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    save_file({n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in model_tensors(cfg)},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _stop_while_writing(p: subprocess.Popen, parent: Path) -> Path:
    """SIGSTOP the run once its temporary folder holds a shard (it is then mid-way: the rename into
    place comes after every tensor), and return that folder."""
    deadline = time.time() + 240
    while time.time() < deadline:
        for d in parent.glob(".*.slidesparse-tmp-*"):
            if any(d.glob("*.safetensors")):
                p.send_signal(signal.SIGSTOP)
                assert d.exists(), "the run finished before it could be stopped"
                return d
        assert p.poll() is None, p.communicate()
        time.sleep(0.002)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_removes_the_temporary_folder(mid_model, tmp_path, sig, code):
    p = _cli("convert", mid_model, tmp_path / "out", "--dtype", "int8", "--threads", "1")
    tmp = _stop_while_writing(p, tmp_path)
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, (out, err)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert lines == [f"error: interrupted by {signal.Signals(sig).name}"], lines
    assert not tmp.exists() and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_kill_9_leftovers_are_removed_by_the_next_run(mid_model, tmp_path):
    p = _cli("convert", mid_model, tmp_path / "out", "--dtype", "int8", "--threads", "1")
    tmp = _stop_while_writing(p, tmp_path)
    p.kill()
    p.communicate(timeout=60)
    assert tmp.exists() and any(tmp.glob("*.safetensors"))  # what kill -9 leaves
    other = tmp_path / "other"
    code, out = run("convert", mid_model, other, "--dtype", "int8", "--threads", "1")  # another destination ...
    assert code == 0, out
    assert tmp.exists()  # ... leaves it alone
    code, out = run("convert", mid_model, tmp_path / "out", "--dtype", "int8", "--threads", "1")
    assert code == 0, out
    assert not tmp.exists() and _leftovers(tmp_path) == []


def test_a_second_run_to_the_same_destination_fails_and_a_newcomer_is_left_alone(mid_model, tmp_path):
    dst = tmp_path / "out"
    first = _cli("convert", mid_model, dst, "--dtype", "int8", "--threads", "1")
    _stop_while_writing(first, tmp_path)
    try:
        one_line_error(*run("convert", mid_model, dst, "--dtype", "int8"), "another slidesparse run",
                       f"pid {first.pid}")
        one_line_error(*run("convert", mid_model, dst, "--dtype", "int8", "--overwrite"), "another slidesparse run")
        # someone else creates the destination while the first run is writing
        dst.mkdir()
        (dst / "theirs.txt").write_text("theirs")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    one_line_error(first.returncode, out + err, "something was put there")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"] and _leftovers(tmp_path) == []


def test_overwrite_replaces_only_the_folder_it_found(mid_model, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    p = _cli("convert", mid_model, dst, "--dtype", "int8", "--threads", "1", "--overwrite")
    _stop_while_writing(p, tmp_path)
    os.rename(dst, tmp_path / "moved")  # the folder it was asked to replace goes away ...
    dst.mkdir()
    (dst / "new.txt").write_text("new")  # ... and another takes its name
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    one_line_error(p.returncode, out + err, "something was put there")
    assert [x.name for x in dst.iterdir()] == ["new.txt"] and (tmp_path / "moved" / "old.txt").exists()
    assert _leftovers(tmp_path) == []
    code, out = run("convert", mid_model, dst, "--dtype", "int8", "--threads", "1", "--overwrite")  # the normal case
    assert code == 0 and not (dst / "new.txt").exists() and (dst / "config.json").exists(), out
    assert _leftovers(tmp_path) == []
