"""Where does the whole SlideSparse linear spend its time outside CUDA graphs (vLLM's prefill path)?

For Llama-3.2-1B's four shapes at M=16384: per-call wall time of the cusparselt backend's op,
called eagerly back to back (what vLLM does for batches above its CUDA-graph sizes), against the
same op replayed from a CUDA graph (GPU time only), and the dense FP8 baseline both ways.
    python3 tools/gpu_diag_linear.py OUT.json
"""
import json
import sys
import time

import torch

from slidesparse.runtime.cusparselt_backend import CusparseltBackend
from slidesparse.core.pattern import parse_pattern, slide
from slidesparse.runtime.backends import SlidWeight

M = 16384
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


def eager_ms(fn, n=30):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def host_ms(fn, n=30):
    """CPU time to issue one call (no sync): if it exceeds the GPU time the call is host-bound."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    h = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return h


def graph_ms(fn, n=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


rows = []
for sp in ("2_4", "2_8"):
    pat = parse_pattern(sp)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda")
        g = w.view(n, -1, pat.group)
        g[..., 0:2] = 0
        slid = slide(w, pat)
        scale = w.abs().amax(1) / 448
        wq = (slid / scale[:, None]).to(torch.float8_e4m3fn)
        layer = torch.nn.Module()
        CusparseltBackend().prepare(layer, SlidWeight(pat, k, n, "fp8_e4m3", "fp8_e4m3", wq, scale.float()))
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        f = lambda: CusparseltBackend().apply(layer, x, None)
        wd = (w / scale[:, None]).to(torch.float8_e4m3fn)
        sb = scale.float().view(1, -1)

        def dense():
            a = x.float().abs().amax(1, keepdim=True) / 448
            q = (x / a).to(torch.float8_e4m3fn)
            return torch._scaled_mm(q, wd.t(), scale_a=a, scale_b=sb, out_dtype=torch.bfloat16)
        r = dict(sparsity=sp, shape=name, n=n, k=k, sparse_eager_ms=eager_ms(f), sparse_host_ms=host_ms(f),
                 sparse_graph_ms=graph_ms(f), dense_eager_ms=eager_ms(dense), dense_host_ms=host_ms(dense),
                 dense_graph_ms=graph_ms(dense))
        rows.append(r)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
