"""Where the host time of one SlideSparse layer call goes, on the GPU host (CUDA, vLLM importable).

    python3 tools/gpu_host_cost.py [--n 2048 --k 2048 --sparsity 2_4 --dtype fp8_e4m3 --m 16] > host_cost.txt

Outside CUDA graphs (vLLM captures them only up to 512 tokens) a small model's step is host-bound,
and the 2026-12-02 tuning tables put our op's call at 80-130 us more than stock vLLM's dense
layer (results/H200/e2e_matrix/README.md). At a small M every GEMM is a few microseconds, so
back-to-back calls (bench/harness.launch_time_ms) measure host time; each row peels one layer of
the call away, so differences between rows attribute it:

    compiled layer, all dense       stock vLLM's traced W8A8 layer (the baseline)
    compiled layer, all CUTLASS     the same with our op in the graph
    op call (dispatcher)            torch.ops.slidesparse.sparse_linear_codes on ready codes
    Python body                     kernels/sparse_linear.linear_from_codes, no dispatcher
    scaled_sparse_mm                the CUTLASS call with its checks and ctypes struct
    vLLM cutlass_scaled_mm          stock vLLM's dense GEMM call, for scale

then the Python body's top functions by own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--sparsity", default="2_4")
    ap.add_argument("--dtype", default="fp8_e4m3")
    ap.add_argument("--m", type=int, default=16)
    a = ap.parse_args()

    from slidesparse.bench.harness import DENSE_EVERYWHERE, launch_time_ms, prepare, random_weight, traced_forward
    from slidesparse.core.quant import quantize_rows
    from slidesparse.core.tuning import MAX_M
    from slidesparse.kernels import cutlass_sparse as cs
    from slidesparse.kernels import sparse_linear as sl
    from slidesparse.kernels.dense import dense_kernel, dense_scaled_mm

    stock = dense_kernel(a.dtype, "cuda")  # vllm_cutlass when vLLM is importable
    if not torch.cuda.is_available():
        raise SystemExit("gpu_host_cost: needs CUDA")
    if cs.why_unavailable():
        raise SystemExit(f"gpu_host_cost: the CUTLASS library is not usable: {cs.why_unavailable()}")
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = random_weight(a.n, a.k, a.sparsity, a.dtype, gen)
    x = torch.randn(a.m, a.k, device="cuda", generator=gen).bfloat16()
    res = torch.randn(a.m, a.n, device="cuda", generator=gen).bfloat16()
    cfg = cs.default_config(w.slid.dtype, a.m)
    rows = []

    be_d, layer_d = prepare(w, DENSE_EVERYWHERE)
    f_d = traced_forward(be_d, layer_d)
    rows.append((f"compiled layer, all dense ({stock})", launch_time_ms(lambda: f_d(x, res))))
    be_c, layer_c = prepare(w, [(MAX_M, "cutlass", 0, cfg)])
    f_c = traced_forward(be_c, layer_c)
    rows.append(("compiled layer, all CUTLASS (our op)", launch_time_ms(lambda: f_c(x, res))))

    codes, s_tok = quantize_rows(x, a.dtype)
    L = layer_c
    op_args = (codes, s_tok, L.ss_w_compressed, L.ss_w_scale, None, L.ss_w_dense, L.ss_n, L.ss_sparsity, L.ss_plan,
               torch.bfloat16, L.ss_cw_values, L.ss_cw_meta, L.ss_cw_k, L.ss_cutlass_configs)
    op = torch.ops.slidesparse.sparse_linear_codes
    rows.append(("op call (dispatcher + Python body)", launch_time_ms(lambda: op(*op_args))))
    rows.append(("Python body (linear_from_codes)", launch_time_ms(lambda: sl.linear_from_codes(*op_args))))
    cw = cs.CompressedWeight(values=L.ss_cw_values, meta=L.ss_cw_meta, n=L.ss_n, k=L.ss_cw_k)
    from slidesparse.kernels.quant_slide import lift_codes
    xl = lift_codes(codes, a.sparsity, cs.K_ALIGN, 1)
    if a.sparsity != "2_4":
        for impl in ("native", "triton"):
            rows.append((f"lift_codes, {impl}",
                         launch_time_ms(lambda: lift_codes(codes, a.sparsity, cs.K_ALIGN, 1, impl=impl))))
    rows.append(("scaled_sparse_mm (checks + ctypes)",
                 launch_time_ms(lambda: cs.scaled_sparse_mm(xl, cw, s_tok, L.ss_w_scale, None, torch.bfloat16, cfg))))
    rows.extend(_native_rows(cs, xl, cw, s_tok, L.ss_w_scale, cfg))
    rows.append((f"dense GEMM call ({stock}, kernels/dense.py)",
                 launch_time_ms(lambda: dense_scaled_mm(codes, layer_d.ss_w_dense, s_tok, layer_d.ss_w_scale, None,
                                                        torch.bfloat16))))
    rows.append(("torch.empty(M, N) on CUDA", launch_time_ms(lambda: torch.empty(a.m, a.n, device="cuda"))))
    rows.append(("torch.cuda.current_stream().cuda_stream",
                 launch_time_ms(lambda: torch.cuda.current_stream().cuda_stream)))
    noop = _noop_op()
    rows.append(("dispatcher alone (same 14-argument schema, empty body)", launch_time_ms(lambda: noop(*op_args))))

    print(f"# {torch.cuda.get_device_name()}, N={a.n} K={a.k} {a.sparsity} {a.dtype} M={a.m}, CUTLASS {cfg}")
    print("# us per call, back-to-back launches (host time where the host is the bottleneck)")
    for name, ms in rows:
        print(f"{name:48s} {ms * 1e3:8.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        sl.linear_from_codes(*op_args)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print("\n# cProfile of 2000 Python-body calls (own time; cProfile inflates small functions)")
    print(s.getvalue())


def _native_rows(cs, xl, cw, s_tok, s_ch, cfg):
    """ss_run alone, its arguments built once: the library's own host cost (CUTLASS's initialize,
    the TMA descriptors, the launch)."""
    import ctypes

    from slidesparse.bench.harness import launch_time_ms
    lib = cs._lib()
    base, opts = cs._parse_config(cfg)
    idx = lib.index[base]
    m, n = xl.shape[0], cw.n
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xl.device)
    args = cs._Args(xl.data_ptr(), cw.values.data_ptr(), cw.meta.data_ptr(), s_tok.data_ptr(), s_ch.data_ptr(), None,
                    out.data_ptr(), m, n, cw.k, opts["mode"], opts["splits"], None, 0,
                    torch.cuda.current_stream().cuda_stream, xl.device.index or 0, opts["swizzle"], opts["raster"])
    size = ctypes.c_size_t(0)
    lib.ss_workspace_size(idx, ctypes.byref(args), ctypes.byref(size))
    ws = torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=xl.device)
    args.workspace, args.workspace_bytes = ws.data_ptr(), int(size.value)
    ref = ctypes.byref(args)
    return [("ss_run alone (prebuilt ctypes arguments)", launch_time_ms(lambda: lib.ss_run(idx, ref)))]


def _noop_op():
    """An op with sparse_linear_codes's schema whose body only allocates: the dispatcher's share."""
    from slidesparse.kernels.library import op

    @op("sshostcost::noop14")
    def noop14(codes: torch.Tensor, s_tok: torch.Tensor, w_compressed: torch.Tensor | None, w_scale: torch.Tensor,
               bias: torch.Tensor | None, w_dense: torch.Tensor | None, n: int, sparsity: str, plan: list[int],
               out_dtype: torch.dtype, cw_values: torch.Tensor | None, cw_meta: torch.Tensor | None, cw_k: int,
               cutlass_configs: str) -> torch.Tensor:
        return codes.new_empty(0)
    return torch.ops.sshostcost.noop14


if __name__ == "__main__":
    main()
