"""The runtime's own linear, set up and timed outside vLLM: what `slidesparse tune` measures and
`slidesparse bench kernel` reports, so that what is tuned and benchmarked is what serves.

    random_weight(n, k, sparsity, dtype)   a pruned (core.prune), quantized, slid random layer
    prepare(weight, plan)                  a layer prepared by the cusparselt backend with that plan
    traced_forward(backend, layer)         the layer as vLLM runs it under torch.compile, between its
                                           producer (RMSNorm, SiLU*mul, attention) and a residual-add
                                           consumer, compiled
    graph_time_ms(fn)                      device time of one call, from CUDA-graph replays
    launch_time_ms(fn)                     wall time of one call launched back to back from Python
    step_time_ms(fn, m)                    the one of the two that vLLM's step at M pays

vLLM replays CUDA graphs only for steps of up to its largest capture size (GRAPH_MAX_M, 512 by
default); larger steps launch the compiled code from Python, so there a layer costs its host time
where that exceeds its GPU time. On the H200 a Llama-3.2-1B prefill step at 1024-4096 tokens is
host-bound, and layers that CUDA-graph replays timed as faster than dense made it slower
(results/H200/history/matrix_session_2026-12-02f); timing such M from back-to-back launches sees that.

The producer and consumer matter: in vLLM, Inductor fuses the layer's per-token quantization into
the kernel that computes x (RMSNorm, SiLU*mul) and, where every bucket is sparse, its dequant into
the kernel that consumes the output (the residual add, SiLU*mul, rotary). Timing the layer alone
would charge it passes that do not exist in a model, or miss ones that do. The dense baseline is
timed in the same context, through the same layer with an all-dense plan, which traces to stock
vLLM's own W8A8 layer (kernels/dense.py, stock_w8a8_linear: INT8 quantized by vLLM's
scaled_int8_quant, FP8 by per-token torch ops, then vLLM's CUTLASS GEMM with the scales in its
epilogue) wherever vLLM is importable. A lifted layer with no dense bucket is timed as
runtime/lift_fusion.py leaves it in vLLM: the RMSNorm kernel writes the lifted codes
(kernels/fused_lift.py), so no lift pass runs.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..core.pattern import parse_pattern, slide
from ..core.prune import prune_magnitude
from ..core.quant import quantize_weight
from ..core.tuning import MAX_M, TuningEntry, TuningTable
from ..runtime.backend import SlidWeight
from ..runtime.cusparselt_backend import CusparseltBackend

__all__ = ["random_weight", "prepare", "plan_entries", "traced_forward", "eager_forward", "graph_time_ms",
           "launch_time_ms", "step_time_ms", "GRAPH_MAX_M", "DENSE_EVERYWHERE", "PRODUCERS", "producer_of",
           "input_width"]

DENSE_EVERYWHERE = ((MAX_M, "dense", 0),)
# vLLM's default largest CUDA-graph capture size: min(2 x max_num_seqs, 512) (CompilationConfig's
# max_cudagraph_capture_size); `slidesparse tune --graph-max-m` for engines set otherwise
GRAPH_MAX_M = 512


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def launch_time_ms(fn, target_ms: float = 4.0, replays: int = 5) -> float:
    """Median wall time of one fn() call when r calls are launched back to back from Python and
    then waited for: the GPU time where the GPU is the bottleneck, the host time where the host is."""
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    r = int(min(max(target_ms / est, 1), 200))
    ts = []
    for _ in range(replays):
        _sync()
        t0 = time.perf_counter()
        for _ in range(r):
            fn()
        _sync()
        ts.append((time.perf_counter() - t0) * 1e3 / r)
    return statistics.median(ts)


def step_time_ms(fn, m: int, graph_max_m: int = GRAPH_MAX_M) -> float:
    """What one call costs inside a vLLM step of M tokens: graph replays up to graph_max_m,
    back-to-back launches above."""
    return graph_time_ms(fn) if m <= graph_max_m else launch_time_ms(fn)


def graph_time_ms(fn, target_ms: float = 4.0, replays: int = 5) -> float:
    """Median device time of one fn() call, from CUDA-graph replays of r back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    r = int(min(max(target_ms / est, 1), 200))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for _ in range(r):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / r)
    del g
    return statistics.median(ts)


def random_weight(n: int, k: int, sparsity: str, dtype: str, gen: torch.Generator) -> SlidWeight:
    """A random [N, K] layer pruned by the converter's rule, quantized per channel and slid, on the
    generator's device (a GEMM's speed does not depend on the values)."""
    pat = parse_pattern(sparsity)
    w = prune_magnitude(torch.randn(n, k, device=gen.device, generator=gen), pat)
    q, scale = quantize_weight(w, dtype)
    del w
    slid = slide(q.float(), pat).to(q.dtype)
    act = dtype if scale is not None else None
    return SlidWeight(pattern=pat, in_features=k, out_features=n, weight_dtype=dtype, act_dtype=act, slid=slid,
                      scale=scale)


def plan_entries(w: SlidWeight, buckets) -> tuple[TuningEntry, ...]:
    """Tuning entries for `w`'s shape from (m_max, backend, alg_id[, cutlass config]) tuples."""
    kl = w.pattern.lifted_k(w.in_features)
    return tuple(TuningEntry(n=w.out_features, k_lifted=kl, dtype=w.weight_dtype, m_max=b[0], backend=b[1],
                             alg_id=b[2], config=b[3] if len(b) > 3 else None) for b in buckets)


def prepare(w: SlidWeight, buckets) -> tuple[CusparseltBackend, torch.nn.Module]:
    """The layer exactly as the runtime prepares it for a checkpoint whose tuning table holds
    `buckets` ((m_max, "sparse" | "cutlass" | "dense", alg_id[, config]) tuples) for its shape."""
    backend = CusparseltBackend(TuningTable(entries=plan_entries(w, buckets)))
    layer = torch.nn.Module()
    backend.prepare(layer, w)
    return backend, layer


RMS_EPS = 1e-6


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # the native RMSNorm vLLM traces when compiling (float32 statistics, result in x's dtype)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * weight


def _allow_many_compiles() -> None:
    # the harness compiles the same small function once per layer and plan (a tuning run: dozens);
    # dynamo counts those as recompiles of one code object and, under fullgraph=True, fails hard
    # past its limit (8 by default). Seen on the GPU host, 2026-12-01: every `slidesparse tune` failed.
    cfg = torch._dynamo.config
    for name, floor in (("recompile_limit", 1 << 12), ("accumulated_recompile_limit", 1 << 16)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), floor))


# The kernel that makes a layer's input in a Llama/Qwen2 decoder, which Inductor fuses the
# per-token quantization into (and, opted in, lift_fusion replaces by one of ours): the residual
# add + RMSNorm before qkv and gate_up, SiLU*mul of gate_up's output before down, the attention
# (an opaque op) before o_proj.
PRODUCERS = ("rms_norm", "silu_mul", "attention")


def producer_of(layer_name: str, config: dict | None = None) -> str:
    """The producer of a vLLM layer's input (PRODUCERS), from its name and the model config."""
    proj = layer_name.rpartition(".")[2]
    if proj == "o_proj":
        return "attention"
    if proj == "down_proj" and (config or {}).get("hidden_act", "silu") == "silu" \
            and "bitnet" not in str((config or {}).get("model_type", "")).lower():
        return "silu_mul"   # (BitNet puts an RMSNorm, its ffn_sub_norm, before down)
    return "rms_norm"


def input_width(k: int, producer: str) -> int:
    """Columns of the producer's input for a layer of K inputs (SiLU*mul reads gate and up)."""
    return 2 * k if producer == "silu_mul" else k


def _forward(backend, layer, bias, producer: str):
    if producer not in PRODUCERS:
        raise ValueError(f"unknown producer {producer!r}: choose one of {', '.join(PRODUCERS)}")
    norm_w = torch.ones(layer.ss_k, dtype=torch.bfloat16,
                        device=layer.ss_w_scale.device if layer.ss_w_scale is not None else "cuda")

    def produce(x):
        if producer == "rms_norm":
            return _rms_norm(x, norm_w)
        if producer == "silu_mul":
            return torch.nn.functional.silu(x[:, :layer.ss_k]) * x[:, layer.ss_k:]
        return x

    def f(x, residual):
        return residual + backend.apply(layer, produce(x), bias)

    def f_lifted(x, residual):
        # what lift_fusion makes of f in vLLM's graph: the producer's kernel writes x' itself
        args = (layer.ss_sparsity, layer.ss_act_dtype, layer.ss_k_align, layer.ss_m_align)
        ops = torch.ops.slidesparse
        lifted, s_tok = (ops.rms_norm_quant_lift(x, norm_w, RMS_EPS, *args) if producer == "rms_norm" else
                         ops.silu_mul_quant_lift(x, *args) if producer == "silu_mul" else ops.quant_lift(x, *args))
        return residual + backend.apply_lifted(layer, lifted, s_tok, bias, x.dtype)
    return f_lifted if getattr(layer, "ss_takes_lifted", False) else f


def traced_forward(backend, layer, bias: torch.Tensor | None = None, producer: str = "rms_norm"):
    """f(x, residual) = residual + layer(producer(x)), compiled by Inductor with a dynamic M, as in
    a vLLM model. Call it with x [M, input_width(K, producer)] and residual [M, N] (bf16)."""
    _allow_many_compiles()
    return torch.compile(_forward(backend, layer, bias, producer), fullgraph=True, dynamic=True)


def eager_forward(backend, layer, bias: torch.Tensor | None = None, producer: str = "rms_norm"):
    """The same computation without torch.compile (vLLM's --enforce-eager)."""
    return _forward(backend, layer, bias, producer)