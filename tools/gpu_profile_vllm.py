"""Where does a vLLM step spend its time? One in-process vLLM engine per checkpoint. Prefill: a
timed prefill, then a torch.profiler trace of two 16384-token steps. Decode (--decode-seqs S): S
sequences of 16 prompt tokens, a timed generation of --decode-len tokens, then a trace of the same
(one 16-token prefill step of S*16 tokens and decode-len - 1 decode steps at M = S, replayed
from CUDA graphs). Each trace gives GPU busy time against wall time (host-bound or not) and the
kernels that take the GPU time.

    source /tmp/site/env.sh; python3 tools/gpu_profile_vllm.py --out DIR [--decode-seqs 256] NAME=CKPT

Writes DIR/profile_NAME.json (top kernels, busy vs wall, per phase) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine runs in this process


def _trace(run) -> tuple[float, dict, list]:
    """Wall ms of run() under torch.profiler, GPU time and launches per kernel name, host ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _timed(run) * 1000
    kernels = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name, [0.0, 0])
            k[0] += ev.device_time_total / 1000.0 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1000.0
            k[1] += 1
    ops = sorted(((e.key, e.cpu_time_total / 1000.0, e.count) for e in prof.key_averages()
                  if e.key.startswith(("slidesparse::", "vllm::", "_C::", "aten::_scaled_mm", "aten::mm"))),
                 key=lambda t: -t[1])[:15]
    return wall, kernels, ops


def _timed(run) -> float:
    """Seconds of run(), the GPU's queued work included."""
    import torch
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _summary(wall: float, kernels: dict, ops: list, top: int = 30) -> dict:
    busy = sum(v[0] for v in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(profiled_wall_ms=wall, gpu_busy_ms=busy,
                kernels=[dict(name=k[:160], ms=v[0], count=v[1]) for k, v in ranked],
                host_ops=[dict(name=k, cpu_ms=t, count=c) for k, t, c in ops])


def profile_decode(llm, vocab: int, seqs: int, length: int) -> dict:
    import torch
    from vllm import SamplingParams
    g = torch.Generator().manual_seed(1)

    def prompts():
        return [{"prompt_token_ids": torch.randint(10, vocab - 10, (16,), generator=g).tolist()} for _ in range(seqs)]

    sp = SamplingParams(max_tokens=length, ignore_eos=True)
    llm.generate(prompts(), sp, use_tqdm=False)                          # warm-up
    ps = prompts()
    out_tok_s = seqs * length / _timed(lambda: llm.generate(ps, sp, use_tqdm=False))
    ps = prompts()
    wall, kernels, ops = _trace(lambda: llm.generate(ps, sp, use_tqdm=False))
    return dict(seqs=seqs, decode_len=length, out_tok_s=out_tok_s, steps=length,
                **_summary(wall, kernels, ops))


def profile_one(name: str, ckpt: str, out: Path, input_len: int = 2048, batched: int = 16384,
                decode_seqs: int = 0, decode_len: int = 128) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=ckpt, max_model_len=max(input_len + 17, 16 + decode_len + 1), max_num_batched_tokens=batched,
              seed=0, gpu_memory_utilization=0.85, max_num_seqs=max(256, decode_seqs))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    per_step = batched // input_len

    def prompts(n):
        return [{"prompt_token_ids": torch.randint(10, vocab - 10, (input_len,), generator=g).tolist()} for _ in range(n)]

    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(prompts(2 * per_step), sp, use_tqdm=False)            # warm-up
    ps = prompts(16 * per_step)
    tok_s = len(ps) * input_len / _timed(lambda: llm.generate(ps, sp, use_tqdm=False))
    ps = prompts(2 * per_step)
    wall_ms, kernels, ops = _trace(lambda: llm.generate(ps, sp, use_tqdm=False))
    res = dict(name=name, ckpt=ckpt, tok_s=tok_s, steps=2, **_summary(wall_ms, kernels, ops))
    if decode_seqs:
        res["decode"] = profile_decode(llm, vocab, decode_seqs, decode_len)
    (out / f"profile_{name}.json").write_text(json.dumps(res, indent=1))
    del llm
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--batched", type=int, default=16384)
    ap.add_argument("--decode-seqs", type=int, default=0, help="also trace decode at this many sequences (0: no)")
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("variant", help="NAME=CHECKPOINT (one per process: engines do not free their memory)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name, ckpt = a.variant.split("=", 1)
    r = profile_one(name, ckpt, out, a.input_len, a.batched, a.decode_seqs, a.decode_len)
    print(f"\n== {r['name']}: {r['tok_s']:,.0f} tok/s; profiled 2 steps: wall {r['profiled_wall_ms']:.1f} ms, "
          f"GPU busy {r['gpu_busy_ms']:.1f} ms")
    for k in r["kernels"][:18]:
        print(f"  {k['ms']:8.2f} ms {k['count']:6d}  {k['name'][:110]}")
    for o in r["host_ops"][:8]:
        print(f"  host {o['cpu_ms']:8.2f} ms {o['count']:6d}  {o['name']}")
    if "decode" in r:
        d = r["decode"]
        print(f"\n== {r['name']} decode: {d['out_tok_s']:,.0f} out tok/s at {d['seqs']} seqs; profiled {d['steps']} steps: "
              f"wall {d['profiled_wall_ms']:.1f} ms, GPU busy {d['gpu_busy_ms']:.1f} ms")
        for k in d["kernels"][:18]:
            print(f"  {k['ms']:8.2f} ms {k['count']:6d}  {k['name'][:110]}")


if __name__ == "__main__":
    main()
