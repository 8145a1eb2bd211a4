"""`slidesparse eval`: perplexity from vLLM's prompt logprobs equals a pure-torch computation of
the same windows, for a plain Hugging Face model and for a SlideSparse checkpoint it serves."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from slidesparse.cli import app
from slidesparse.convert import convert, make_model
from slidesparse.core.text import load_tokenizer, windows
from slidesparse.runtime.torch_reference import TorchReference

WINDOW = 64
WORDS = ("the", "of", "a", "model", "weights", "sparse", "group", "tensor", "core", "we", "prune", "two",
         "in", "every", "eight", "and", "then", "serve", "it", "with", "text", "is", "not", "all")


def english_like(n_words: int, rng: random.Random) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % 9 == 0 else w)
        if i % 9 == 8:
            out[-1] += "."
    return " ".join(out) + "\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model, its 2_4 INT8 checkpoint and a text. The perplexity checks below match
    eval's numbers to 1e-3, which only tells the pruned model from the dense one if their
    perplexities differ by more: on a random model they usually differ by 10-20%, but about one
    seed in a few hundred lands them within 0.1% (one CI run), so such a seed is drawn again."""
    for _ in range(5):
        root = tmp_path_factory.mktemp("eval")
        seed = random.SystemRandom().randrange(2**31)
        make_model("tiny-llama", root / "dense", seed=seed)
        convert(root / "dense", root / "pruned", sparsity="2_4", dtype="int8")
        text = root / "eval.txt"
        text.write_text(english_like(700, random.Random(seed)), encoding="utf-8")
        from transformers import AutoModelForCausalLM
        ws = windows(load_tokenizer(root / "dense")(text.read_text()), WINDOW)
        dense = AutoModelForCausalLM.from_pretrained(str(root / "dense"), dtype=torch.float32).eval()
        pruned = TorchReference(str(root / "pruned")).model
        if abs(ppl(torch_window_scores(pruned, ws)) / ppl(torch_window_scores(dense, ws)) - 1) > 2e-2:
            break
    return root, text


def torch_window_scores(model, ws):
    """Per window: (log-probabilities of the actual next tokens, argmax tokens), pure torch."""
    out = []
    with torch.no_grad():
        for w in ws:
            logits = model(input_ids=torch.tensor([w])).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1)
            tgt = torch.tensor(w[1:])
            out.append((lp[torch.arange(len(tgt)), tgt], logits.argmax(-1)))
    return out


def ppl(scores):
    return math.exp(-float(torch.cat([s for s, _ in scores]).mean()))


@pytest.mark.vllm
@pytest.mark.slow
def test_perplexity_equals_pure_torch(setup):
    root, text = setup
    p = subprocess.run([sys.executable, "-m", "slidesparse.cli", "eval", str(root / "pruned"), "--text", str(text),
                        "--json", "--window", str(WINDOW), "--dtype", "float32", "--source", str(root / "dense")],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)  # stdout is the JSON alone (vLLM's logs go to stderr)
    ws = windows(load_tokenizer(root / "dense")(text.read_text()), WINDOW)
    assert r["windows"] == len(ws) >= 10 and r["tokens"] == len(ws) * (WINDOW - 1) and r["window"] == WINDOW

    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(str(root / "dense"), dtype=torch.float32).eval()
    want_dense = torch_window_scores(dense, ws)
    assert abs(r["source_perplexity"] / ppl(want_dense) - 1) < 1e-3, (r["source_perplexity"], ppl(want_dense))
    # the SlideSparse checkpoint as served (plugin, reference backend) vs the torch oracle of it
    want_pruned = torch_window_scores(TorchReference(str(root / "pruned")).model, ws)
    assert abs(r["perplexity"] / ppl(want_pruned) - 1) < 1e-3, (r["perplexity"], ppl(want_pruned))
    assert abs(ppl(want_pruned) / ppl(want_dense) - 1) > 1e-2  # 2_4 pruning moved it: the two are told apart
    agree = float(torch.cat([a == b for (_, a), (_, b) in zip(want_pruned, want_dense)]).double().mean())
    assert 0 < r["top1_agreement"] < 1 and abs(r["top1_agreement"] - agree) < 0.02, (r["top1_agreement"], agree)


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, (r.stdout or "") + (r.stderr or "")


def test_cli_errors(setup, tmp_path):
    root, text = setup
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    cases = [
        ((root / "dense", "--text", tmp_path / "missing.txt"), "no such file"),
        ((root / "dense", "--text", latin1), "not UTF-8"),
        ((root / "dense", "--text", short), "no complete window"),
        ((root / "dense", "--text", text, "--max-tokens", "10"), "less than one window"),
        ((tmp_path / "nomodel", "--text", text), "no such checkpoint"),
        ((root / "dense", "--text", text, "--source", tmp_path / "nomodel"), "--source"),
        ((root / "dense", "--text", text, "--dtype", "int4"), "unknown --dtype"),
    ]
    for args, word in cases:
        code, out = run("eval", *args)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], (args, out)
