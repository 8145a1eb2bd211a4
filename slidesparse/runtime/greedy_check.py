"""Greedy tokens from real vLLM for several checkpoints in one process (start-up paid once).

    python -m slidesparse.runtime.greedy_check OUT.json CKPT [CKPT ...] [--prompts JSON]
        [--max-tokens N] [--tp N] [--compile] [--dtype float32]

Writes {ckpt: [[token ids] per prompt]} (or {ckpt: {"error": "..."}}) to OUT.json. The tests run
it in a subprocess so vLLM's process-wide state (thread binding, distributed groups) stays out of
the pytest process; the GPU host runs the same command against vLLM 0.26.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

DEFAULT_PROMPTS = [[1, 5, 9, 33, 100, 7], [7, 8, 300], [2, 250, 251, 17, 17, 17, 90, 3, 44], [11]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--prompts", default=None, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="vLLM's default torch.compile path (else eager)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="per engine, on GPUs (several engines share one process there)")
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.tp == 1:
        # in-process engine: a second LLM() then starts in seconds, and errors keep their message
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    prompts = json.loads(a.prompts) if a.prompts else DEFAULT_PROMPTS
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True, detokenize=False)
    results = {}
    for ckpt in a.ckpts:
        llm = None
        try:
            llm = LLM(model=ckpt, skip_tokenizer_init=True, enforce_eager=not a.compile, dtype=a.dtype,
                      max_model_len=256, max_num_seqs=8, tensor_parallel_size=a.tp, seed=0,
                      **({"gpu_memory_utilization": a.gpu_memory_utilization} if a.gpu_memory_utilization else {}))
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            results[ckpt] = [list(o.outputs[0].token_ids) for o in outs]
        except Exception as e:  # noqa: BLE001 - reported per checkpoint, the tests decide
            results[ckpt] = {"error": f"{type(e).__name__}: {e}"}
        del llm
        gc.collect()
    from ..core.io import atomic_write
    atomic_write(a.out, json.dumps({"prompts": prompts, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
