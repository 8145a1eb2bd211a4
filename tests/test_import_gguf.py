"""import-gguf: a GGUF file written here (from a fresh random Llama model, q/k rows in llama.cpp's
rotary layout, Q8_0 / Q4_1 / F32 tensors) comes back as the Hugging Face checkpoint it was made from."""

from __future__ import annotations

import json

import gguf  # installed by tools/setup_env.sh
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from slidesparse.cli import app
from slidesparse.convert import make_model
from slidesparse.convert.gguf_import import import_gguf

Q = gguf.GGMLQuantizationType

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_NAMES[rest.removesuffix('.weight')]}.weight"


def to_llamacpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script: per head, the two halves of the rows are interleaved, so that
    rows 2i and 2i+1 form one rotary pair (Hugging Face pairs row i with row i + head_dim/2)."""
    n, k = w.shape
    return w.reshape(heads, 2, n // heads // 2, k).swapaxes(1, 2).reshape(n, k)


def qtype_for(name: str) -> Q:
    if name.endswith("norm.weight"):
        return Q.F32
    return Q.Q8_0 if "embed" in name or "v_proj" in name or "down" in name else Q.Q4_1


def write_gguf(src, path, pre="gpt-2", arch="llama", qtype=None):
    """The GGUF file llama.cpp would write for the HF model `src`; returns the dequantized
    values of every tensor, in Hugging Face layout (what the importer must give back)."""
    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in tok["added_tokens"]}
    tokens = [t for t, _ in vocab] + [added[i]["content"] for i in sorted(added) if i >= len(vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    expect = {}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, t in weights.items():
        a = t.float().numpy()
        qt = (qtype or qtype_for)(name)
        leaf = name.split(".")[-2]
        stored = to_llamacpp_rows(a, heads[leaf]) if leaf in heads else a
        data = stored if qt == Q.F32 else gguf.quants.quantize(stored, qt)
        w.add_tensor(gguf_name(name), data, raw_dtype=qt)
        back = gguf.quants.dequantize(data, qt).reshape(a.shape)
        expect[name] = (back, stored.shape, qt, leaf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, expect


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf") / "tiny-llama"
    make_model("tiny-llama", d, dtype="fp32", seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    return d


def rope_pairs(x, pos, theta, interleaved):
    """Rotary embedding of x [T, head_dim]: pairs (2i, 2i+1) (llama.cpp) or (i, i + d/2) (HF)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos(), ang.sin()
    if interleaved:
        a, b = x[:, 0::2], x[:, 1::2]
        out = torch.empty_like(x)
        out[:, 0::2], out[:, 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[:, : d // 2], x[:, d // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def test_round_trip(src, tmp_path):
    cfg, expect = write_gguf(src, tmp_path / "m.gguf")
    r = import_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="fp32")
    assert set(r["gguf_types"]) == {"F32", "Q8_0", "Q4_1"}
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(out) == set(expect)
    hd, theta = cfg["head_dim"], cfg["rope_theta"]
    x = torch.randn(7, cfg["hidden_size"], dtype=torch.float64)
    pos = torch.arange(7)
    for name, (back, stored_shape, qt, leaf) in expect.items():
        got = out[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == back.shape, name
        if leaf not in ("q_proj", "k_proj"):
            assert torch.equal(got, torch.from_numpy(back)), name  # dequantized bit for bit
            continue
        # the stored rows are in llama.cpp's layout; the import must give rows whose rotary
        # (HF's halves convention) scores equal llama.cpp's interleaved rotary on the stored rows
        stored = torch.from_numpy(back).double()
        q_hf = got.double()
        for h in range(got.shape[0] // hd):
            rows = slice(h * hd, (h + 1) * hd)
            a = rope_pairs(x @ stored[rows].T, pos, theta, interleaved=True)
            b = rope_pairs(x @ q_hf[rows].T, pos, theta, interleaved=False)
            torch.testing.assert_close(a @ a.T, b @ b.T, rtol=1e-9, atol=1e-9)
        # and they are a permutation of the stored rows, never a mixture
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, stored.float().tolist())), name
    cfg_out = json.loads((tmp_path / "hf" / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "bos_token_id", "eos_token_id"):
        assert cfg_out[k] == cfg[k], k
    assert cfg_out["tie_word_embeddings"] is True and cfg_out["architectures"] == ["LlamaForCausalLM"]


def test_logits_match_the_source_model(src, tmp_path):
    """The imported checkpoint is the model it came from, up to the 8-bit rounding of its weights
    (Q8_0 everywhere here): its logits follow the source's, much closer than those of the same
    import with q/k left in llama.cpp's row order (which scrambles attention)."""
    from transformers import AutoModelForCausalLM

    write_gguf(src, tmp_path / "m.gguf", qtype=lambda name: Q.F32 if name.endswith("norm.weight") else Q.Q8_0)
    import_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="fp32")
    ids = torch.randint(0, 500, (1, 48))

    def logits(path, scramble=False):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        if scramble:
            cfg = m.config
            for layer in m.model.layers:
                for proj, heads in ((layer.self_attn.q_proj, cfg.num_attention_heads),
                                    (layer.self_attn.k_proj, cfg.num_key_value_heads)):
                    proj.weight.data = torch.from_numpy(to_llamacpp_rows(proj.weight.data.numpy(), heads))
        with torch.no_grad():
            return m(ids).logits[0]

    ref = logits(src)
    err = (logits(tmp_path / "hf") - ref).abs().mean() / ref.abs().mean()
    err_scrambled = (logits(tmp_path / "hf", scramble=True) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.08 and err < err_scrambled / 10, (float(err), float(err_scrambled))


def test_tokenizer(src, tmp_path):
    from tokenizers import Tokenizer

    write_gguf(src, tmp_path / "m.gguf")
    import_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    a = Tokenizer.from_file(str(src / "tokenizer.json"))
    b = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    text = "the cat sat on the mat; there, then 42 others at 3.5 o'clock. Ünïcode é\n\n  end"
    assert b.encode(text, add_special_tokens=False).ids == a.encode(text, add_special_tokens=False).ids
    assert b.decode(b.encode(text, add_special_tokens=False).ids) == text
    # smollm's pre-tokenizer splits every digit off on its own (llama.cpp's rule)
    write_gguf(src, tmp_path / "s.gguf", pre="smollm")
    import_gguf(tmp_path / "s.gguf", tmp_path / "hf-s")
    s = Tokenizer.from_file(str(tmp_path / "hf-s" / "tokenizer.json"))
    pieces = s.pre_tokenizer.pre_tokenize_str("in 2024 then")
    assert [p for p, _ in pieces] == ["in", "Ġ", "2", "0", "2", "4", "Ġthen"]


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, (r.stdout or "") + (r.stderr or "")


def test_cli_errors(src, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    for args, word in [((bad, tmp_path / "o1"), "not a readable GGUF"),
                       ((tmp_path / "missing.gguf", tmp_path / "o2"), "no such file")]:
        code, out = run("import-gguf", *args)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], out
    write_gguf(src, tmp_path / "g.gguf", arch="gpt2")
    code, out = run("import-gguf", tmp_path / "g.gguf", tmp_path / "o3")
    assert code == 2 and "architecture 'gpt2'" in out and "Traceback" not in out, out
    assert not (tmp_path / "o3").exists()


def test_overwrite_onto_the_folder_that_holds_the_gguf_file_is_refused(src, tmp_path):
    # issue 11, item 1 for import-gguf: replacing the folder that holds the input deletes it
    anc = tmp_path / "anc"
    anc.mkdir()
    write_gguf(src, anc / "m.gguf")
    before = (anc / "m.gguf").read_bytes()
    for out in (anc, tmp_path, anc / "m.gguf"):
        code, msg = run("import-gguf", anc / "m.gguf", out, "--overwrite")
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "the GGUF file" in lines[0], msg
    assert sorted(p.name for p in anc.iterdir()) == ["m.gguf"] and (anc / "m.gguf").read_bytes() == before
