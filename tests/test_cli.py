"""Bad input to the CLI ends in one line `error: ...` and exit code 2 (verify failures: exit 1)."""

import json
import shutil

import pytest
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
    assert code == 0 and "layers.0.self_attn.q_proj" in out
    code, out = run("verify", dst, "--source", model)
    assert code == 0 and "14 layers verified against the source" in out
    other = tmp_path / "other"
    make_model("tiny-llama", other, seed=2)
    code, out = run("verify", dst, "--source", other)
    assert code == 1 and out.startswith("error: ") and "differs" in out, out
