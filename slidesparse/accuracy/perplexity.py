"""`slidesparse eval MODEL --text FILE`: perplexity from vLLM's prompt logprobs.

The text is tokenized with MODEL's tokenizer and cut into consecutive, non-overlapping windows of
`window` tokens (core/text.py; default 512; a trailing partial window is dropped, and
--max-tokens keeps the first windows that fit). Each window is one prompt; vLLM returns the
log-probability of every prompt token given the tokens before it in the window, and the
perplexity is exp(mean negative log-likelihood) over all scored tokens: every token of every
window but its first, which has no context (window - 1 per window). The windows are
independent: the model never sees text from a previous window.

MODEL is anything vLLM loads: a SlideSparse checkpoint (the plugin serves it; on CPU through the
reference backend), the dense W8A8 compressed-tensors export, or a plain Hugging Face checkpoint
(the dense reference). With --source, the source model is evaluated on the same windows too, and
the top-1 agreement is the share of scored positions where both models' most likely next token
is the same.

vLLM runs in this process, one model after the other, with its in-process engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0), as runtime/greedy_check.py does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from pathlib import Path

from ..core.checkpoint import Checkpoint
from ..core.errors import SlideSparseError
from ..core.text import TextError, describe, load_text, load_tokenizer, windows

DEFAULT_WINDOW = 512
DTYPES = ("bfloat16", "float16", "float32", "auto")


class EvalError(SlideSparseError):
    """Bad input to `slidesparse eval` (a model, text or option that cannot be evaluated)."""


def _check_model(path, what: str) -> Checkpoint:
    p = Path(path)
    try:
        return Checkpoint(p)  # config.json and every safetensors header, validated
    except SlideSparseError as e:
        raise EvalError(f"{what}: {e}") from None


def _windows(model: Path, text, window: int, max_tokens: int | None) -> list[list[int]]:
    try:
        ids = load_tokenizer(model)(text.content)
        ws = windows(ids, window)
    except TextError as e:
        raise EvalError(str(e)) from None
    if max_tokens is not None:
        ws = ws[: max_tokens // window]
    if not ws:
        raise EvalError(f"{text.name}: no complete window of {window} tokens "
                        f"({len(ids)} tokens{f', --max-tokens {max_tokens}' if max_tokens is not None else ''})")
    return ws


@contextlib.contextmanager
def _stdout_to_stderr():
    """vLLM logs (and its C++ code prints) to stdout; keep stdout for the result (--json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_vllm(model: str, prompts: list[list[int]], dtype: str, window: int) -> list[list[tuple[float, int]]]:
    """Per window, per scored position: (log-probability of the actual token, top-1 token id)."""
    with _stdout_to_stderr():
        return _vllm_logprobs(model, prompts, dtype, window)


def _vllm_logprobs(model, prompts, dtype, window):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = None
    try:
        try:
            llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype=dtype,
                      max_model_len=window + 1, max_num_seqs=16, seed=0)
            # prompt_logprobs=1: the actual token's logprob, plus the top-1 token when it differs
            sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - vLLM raises many types; the user gets one line
            msg = " ".join(str(e).split())[:400]
            raise EvalError(f"{model}: vLLM could not evaluate it ({type(e).__name__}: {msg})") from None
        result = []
        for p, o in zip(prompts, outs):
            lp = o.prompt_logprobs
            if lp is None or len(lp) != len(p):
                raise EvalError(f"{model}: vLLM returned no prompt logprobs for a window")
            rows = []
            for j in range(1, len(p)):
                d = lp[j]
                top = next(t for t, v in d.items() if v.rank == 1)
                rows.append((float(d[p[j]].logprob), int(top)))
            result.append(rows)
        return result
    finally:
        del llm
        gc.collect()


def _perplexity(rows) -> tuple[float, float, int]:
    nll = -sum(lp for w in rows for lp, _ in w)
    n = sum(len(w) for w in rows)
    return math.exp(nll / n), nll / n, n


def evaluate(model, text, window: int = DEFAULT_WINDOW, max_tokens: int | None = None, source=None,
             dtype: str = "bfloat16") -> dict:
    """Perplexity of `model` (and with `source`, the source's and the top-1 agreement) on the
    UTF-8 text file `text`; returns the summary dict `slidesparse eval --json` prints."""
    if window < 2:
        raise EvalError(f"--window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < window:
        raise EvalError(f"--max-tokens {max_tokens} is less than one window of {window} tokens")
    if dtype not in DTYPES:
        raise EvalError(f"unknown --dtype {dtype!r}: choose {', '.join(DTYPES)}")
    model_ckpt = _check_model(model, "MODEL")
    src_ckpt = _check_model(source, "--source") if source is not None else None
    try:
        txt = load_text(text)
    except TextError as e:
        raise EvalError(str(e)) from None
    prompts = _windows(model_ckpt.path, txt, window, max_tokens)
    if src_ckpt is not None and _windows(src_ckpt.path, txt, window, max_tokens) != prompts:
        raise EvalError(f"{source}: its tokenizer reads the text differently from MODEL's; "
                        "agreement needs the same tokens")
    t0 = time.perf_counter()
    rows = _run_vllm(str(model_ckpt.path), prompts, dtype, window)
    ppl, nll, n = _perplexity(rows)
    out = {"model": str(model), "perplexity": ppl, "nll": nll, "tokens": n, "windows": len(prompts),
           "window": window, "dtype": dtype, "text": describe(txt), "seconds": round(time.perf_counter() - t0, 2)}
    if src_ckpt is not None:
        t1 = time.perf_counter()
        src_rows = _run_vllm(str(src_ckpt.path), prompts, dtype, window)
        s_ppl, s_nll, _ = _perplexity(src_rows)
        same = sum(a[1] == b[1] for w, v in zip(rows, src_rows) for a, b in zip(w, v))
        out.update(source=str(source), source_perplexity=s_ppl, source_nll=s_nll, top1_agreement=same / n,
                   source_seconds=round(time.perf_counter() - t1, 2))
    return out
