"""The GPU linear's composition (kernels/sparse_linear.py) as vLLM traces it, on the CPU: the two
GEMMs are emulated in float32, everything else (the torch-op quantization in x's shape, the
bucket routing inside the ops, the lift and row padding of the codes, the dequant) is the real
code. Each bucket must equal the eager reference composition, at M the trace never saw."""

from __future__ import annotations

import pytest
import torch

from slidesparse.core.pattern import parse_pattern
from slidesparse.core.quant import quantize_rows
from slidesparse.kernels import cusparselt as cl
from slidesparse.kernels import dense
from slidesparse.kernels import sparse_linear as sl
from slidesparse.kernels.reference import dequant_ref, quant_slide_ref
from slidesparse.runtime.cusparselt_backend import CusparseltBackend

N, K = 64, 96


def _emulated(monkeypatch):
    # like cuSPARSELt's, the result has the weight's rows padded to N_ALIGN (here: zero columns)
    monkeypatch.setattr(cl, "sparse_mm", lambda wc, xq, out_dtype, alg_id=0, split_k=1, n=None:
                        torch.nn.functional.pad(xq.float() @ wc.float().T, (0, (n or wc.shape[0]) - wc.shape[0]))
                        .to(out_dtype))
    monkeypatch.setattr(dense, "dense_scaled_mm", lambda q, w, s_tok, s_ch, bias, out_dtype, kernel=None:
                        ((q.float() @ w.float().T) * s_tok[:, None] * s_ch
                         + (0.0 if bias is None else bias.float())).to(out_dtype))


def _layer(plan, g, sparsity="2_8", n=N, k=K):
    """A layer as CusparseltBackend.prepare leaves it (the compressed weight stood in by the
    padded slid weight, which the emulated GEMM multiplies)."""
    pat = parse_pattern(sparsity)
    kl = pat.lifted_k(k) + (-pat.lifted_k(k)) % cl.K_ALIGN
    layer = torch.nn.Module()
    layer.ss_w_compressed = (torch.randn(n, kl, generator=g) * 4).to(torch.float8_e4m3fn)
    layer.ss_w_dense = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn)
    layer.ss_w_scale = torch.rand(n, generator=g) + 0.5
    layer.ss_n, layer.ss_k, layer.ss_sparsity, layer.ss_act_dtype = n, k, pat.name, "fp8_e4m3"
    layer.ss_plan, layer.ss_finishes = plan, bool(sl.plan_kinds(plan) & {sl.DENSE, sl.CUTLASS})
    # as prepare() sets it: a lifted pattern with no dense bucket takes x' from quant_lift
    layer.ss_takes_lifted = pat.L != 4 and sl.DENSE not in sl.plan_kinds(plan)
    layer.ss_k_align, layer.ss_m_align = cl.K_ALIGN, cl.M_ALIGN if sl.SPARSE in sl.plan_kinds(plan) else 1
    layer.ss_cw_values = layer.ss_cw_meta = None
    layer.ss_cw_k, layer.ss_cutlass_configs = 0, ""
    layer.ss_stock_dense = False
    return layer


def _expected(layer, x2, bias, dense_bucket):
    if dense_bucket:
        q, s = quantize_rows(x2, "fp8_e4m3")
        return ((q.float() @ layer.ss_w_dense.float().T) * s[:, None] * layer.ss_w_scale + bias.float()).bfloat16()
    q, s = quant_slide_ref(x2, layer.ss_sparsity, "fp8_e4m3", k_align=cl.K_ALIGN)
    acc = (q.float() @ layer.ss_w_compressed.float().T).bfloat16()
    return dequant_ref(acc, s, layer.ss_w_scale, bias, torch.bfloat16)


@pytest.mark.parametrize("sparsity", ["2_4", "2_8", "2_inf"])
def test_traced_layer_routes_buckets(monkeypatch, sparsity):
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(N, generator=g).bfloat16()
    mixed = _layer([20, sl.DENSE, 0, 1, 65536, sl.SPARSE, 0, 1], g, sparsity)
    sparse = _layer([], g, sparsity)
    for layer in (mixed, sparse):
        f = torch.compile(lambda x, layer=layer: CusparseltBackend().apply(layer, x, bias), dynamic=True,
                          fullgraph=True)
        # M=17..20 pad to 32 rows for the sparse GEMM: the bucket follows the true M, as in eager mode
        for m in (3, 17, 20, 21, 300):
            x = (torch.randn(1, m, K, generator=g) * 2).bfloat16()
            out = f(x)
            assert out.shape == (1, m, N) and out.dtype == torch.bfloat16
            ref = _expected(layer, x[0], bias, layer is mixed and m <= 20)
            torch.testing.assert_close(out[0].float(), ref.float(), rtol=2 ** -7, atol=1e-3)


class _FakeStockOps:
    """vllm._custom_ops' two W8A8 functions as torch math (their CUDA kernels are not on this machine)."""

    def __init__(self):
        self.calls = []

    def scaled_int8_quant(self, x, scale, azp, symmetric=True):
        self.calls.append("scaled_int8_quant")
        q, s = quantize_rows(x, "int8")
        return q, s.view(-1, 1), None

    def cutlass_scaled_mm(self, a, b, scale_a, scale_b, out_dtype, bias=None):
        self.calls.append("cutlass_scaled_mm")
        out = (a.float() @ b.float()) * scale_a * scale_b.view(1, -1)
        return (out + (0.0 if bias is None else bias.float())).to(out_dtype)


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3"])
def test_a_layer_dense_at_every_m_traces_stock_ops_and_no_op_of_ours(monkeypatch, act):
    """ss_stock_dense: the compiled layer is the quantization and cutlass_scaled_mm, traced into the
    graph (no slidesparse op, whose host cost showed outside CUDA graphs on the H200), with the
    quantized math's result. The real ops are checked on the GPU (tests/gpu/test_kernels_gpu.py)."""
    ops = _FakeStockOps()
    monkeypatch.setattr(dense, "_STOCK_OPS", ops)
    g = torch.Generator().manual_seed(11)
    layer = _layer([65536, sl.DENSE, 0, 1], g)
    wdt = torch.int8 if act == "int8" else torch.float8_e4m3fn
    layer.ss_w_dense = (torch.randn(N, K, generator=g) * 20).clamp(-100, 100).to(wdt)
    layer.ss_act_dtype, layer.ss_stock_dense = act, True
    bias = torch.randn(N, generator=g).bfloat16()
    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    f = torch.compile(lambda x: CusparseltBackend().apply(layer, x, bias), dynamic=True, fullgraph=True,
                      backend=capture)
    for m in (3, 40):
        x = (torch.randn(1, m, K, generator=g) * 2).bfloat16()
        out = f(x)
        q, s = quantize_rows(x[0], act)
        ref = ((q.float() @ layer.ss_w_dense.float().T) * s[:, None] * layer.ss_w_scale + bias.float()).bfloat16()
        assert out.shape == (1, m, N)
        torch.testing.assert_close(out[0].float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    assert not [t for t in seen if "slidesparse" in t], seen
    # traced: the fake functions ran while Dynamo traced them (their torch ops are in the graph)
    assert ops.calls.count("cutlass_scaled_mm") >= 1
    assert ("scaled_int8_quant" in ops.calls) == (act == "int8")


def test_ops_have_consistent_fakes(monkeypatch):
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(2)
    codes = (torch.randn(7, K, generator=g) * 30).to(torch.int8)
    wc = torch.randint(-5, 5, (N, 192), generator=g, dtype=torch.int8)
    torch.library.opcheck(torch.ops.slidesparse.sparse_mm.default, (codes, wc, N, "2_8", []),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="every bucket is sparse"):
        torch.ops.slidesparse.sparse_mm(codes, wc, N, "2_8", [16, sl.DENSE, 0, 1])


def test_choose_takes_the_first_bucket_that_covers_m():
    plan = [16, sl.DENSE, 0, 1, 256, sl.SPARSE, 3, 1, 4096, sl.SPARSE, 5, 2]
    assert [sl.choose(plan, m) for m in (1, 16, 17, 256, 257, 4096, 10 ** 7)] == [
        (sl.DENSE, 0, 1), (sl.DENSE, 0, 1), (sl.SPARSE, 3, 1), (sl.SPARSE, 3, 1), (sl.SPARSE, 5, 2),
        (sl.SPARSE, 5, 2), (sl.SPARSE, 5, 2)]


def test_traced_cutlass_buckets_finish_the_output_in_their_epilogue(monkeypatch):
    """A plan with CUTLASS buckets (SlideSparse's kernel, scales and bias in its epilogue): the
    traced layer hands the codes and token scales to the op, which lifts the codes (no row
    padding) and returns the finished output; its config list is indexed by the bucket's alg_id."""
    from slidesparse.kernels import cutlass_sparse as cs
    _emulated(monkeypatch)
    seen = []

    def fake_cutlass(x_lifted, w, s_tok, s_ch, bias=None, out_dtype=torch.bfloat16, config=None):
        seen.append((config, x_lifted.shape[0]))
        acc = x_lifted.float() @ w.values.float().T  # the test's "compressed" weight is the padded slid one
        return (acc * s_tok[:, None] * s_ch + bias.float()).to(out_dtype)
    monkeypatch.setattr(cs, "scaled_sparse_mm", fake_cutlass)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(N, generator=g).bfloat16()
    layer = _layer([20, sl.CUTLASS, 1, 1, 65536, sl.DENSE, 0, 1], g)
    layer.ss_cw_values, layer.ss_cw_meta, layer.ss_cw_k = layer.ss_w_compressed, torch.zeros(1, dtype=torch.uint8), \
        layer.ss_w_compressed.shape[1]
    layer.ss_cutlass_configs = "cfg_a;cfg_b"
    f = torch.compile(lambda x: CusparseltBackend().apply(layer, x, bias), dynamic=True, fullgraph=True)
    for m in (3, 17, 300):
        x = (torch.randn(m, K, generator=g) * 2).bfloat16()
        out = f(x)
        if m <= 20:
            q, s = quant_slide_ref(x, layer.ss_sparsity, "fp8_e4m3", k_align=cl.K_ALIGN)
            ref = ((q.float() @ layer.ss_w_compressed.float().T) * s[:, None] * layer.ss_w_scale
                   + bias.float()).bfloat16()
        else:
            ref = _expected(layer, x, bias, dense_bucket=True)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    assert seen == [("cfg_b", 3), ("cfg_b", 17)]  # alg_id 1 of the layer's configs; M unpadded


def test_cutlass_buckets_fall_back_to_cusparselt_where_the_kernel_cannot_run():
    from slidesparse.runtime.cusparselt_backend import _cutlass_usable
    plan = [16, sl.CUTLASS, 0, 1, 4096, sl.SPARSE, 3, 1]
    fallback = [16, sl.SPARSE, 0, 1, 4096, sl.SPARSE, 3, 1]
    # no GPU (and no built library) on this machine: the reason is given, the plan keeps its buckets
    got, why = _cutlass_usable(plan, ["c"], torch.float8_e4m3fn, 64, True)
    assert got == fallback and why
    assert _cutlass_usable(plan, ["c"], torch.float8_e4m3fn, 64, False) == (fallback, "it takes FP8 / INT8 activations only")
    assert _cutlass_usable(plan, ["c"], torch.float8_e4m3fn, 60, True)[1] == "N=60 is not a multiple of 8"
    assert _cutlass_usable(fallback, [], torch.float8_e4m3fn, 60, True) == (fallback, None)


def test_the_harness_compiles_as_many_layers_as_a_tuning_run_needs(monkeypatch):
    """bench/harness.traced_forward compiles one small function per layer and plan; a tuning run
    makes dozens, past dynamo's default recompile limit (8), which under fullgraph=True is a hard
    failure (every `slidesparse tune` failed that way on the GPU host before the limit was raised)."""
    from slidesparse.bench.harness import traced_forward
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(9)
    for i in range(12):  # layer shapes and plans differ, as in a tuning run: each one a recompile
        n, k = 32 + 8 * i, 96 + 16 * i
        layer = _layer([] if i % 2 else [20 + i, sl.DENSE, 0, 1], g, n=n, k=k)
        producer = ("rms_norm", "silu_mul", "attention")[i % 3]
        f = traced_forward(CusparseltBackend(), layer, producer=producer)
        x = torch.randn(5, 2 * k if producer == "silu_mul" else k, generator=g).bfloat16()
        out = f(x, torch.zeros(5, n, dtype=torch.bfloat16))
        assert out.shape == (5, n) and bool(torch.isfinite(out.float()).all())


@pytest.mark.parametrize("producer", ("rms_norm", "silu_mul", "attention"))
def test_the_harness_times_each_layer_behind_its_producer(monkeypatch, producer):
    """traced_forward(producer=...) computes residual + layer(producer(x)): SiLU*mul of a [M, 2K]
    input for down, the input itself for o_proj (the attention's output), RMSNorm otherwise."""
    from slidesparse.bench.harness import input_width, traced_forward
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(N, generator=g).bfloat16()
    for plan in ([20, sl.DENSE, 0, 1, 65536, sl.SPARSE, 0, 1], []):
        layer = _layer(plan, g)
        f = traced_forward(CusparseltBackend(), layer, bias, producer=producer)
        for m in (3, 40):
            x = (torch.randn(m, input_width(K, producer), generator=g) * 2).bfloat16()
            res = torch.randn(m, N, generator=g).bfloat16()
            # the producer in float32: Inductor keeps its output there, where eager rounds to bf16
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) if producer == "rms_norm" else
                 torch.nn.functional.silu(xf[:, :K]) * xf[:, K:] if producer == "silu_mul" else x)
            ref = res.double() + _expected(layer, y, bias, bool(plan) and m <= 20).double()
            err = float((f(x, res).double() - ref).norm() / ref.norm())
            # bf16 roundings of the output and the residual add, and an FP8 code that differs by a step
            # where the reduction order differs: well under 1.5%; a wrong producer is off by O(1)
            assert err < 1.5e-2, (producer, plan, m, err)
