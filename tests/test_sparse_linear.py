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
    monkeypatch.setattr(cl, "sparse_mm", lambda wc, xq, out_dtype, alg_id=0, split_k=1, n=None:
                        (xq.float() @ wc.float().T).to(out_dtype))
    monkeypatch.setattr(dense, "dense_scaled_mm", lambda q, w, s_tok, s_ch, bias, out_dtype, kernel=None:
                        ((q.float() @ w.float().T) * s_tok[:, None] * s_ch + bias.float()).to(out_dtype))


def _layer(plan, g, sparsity="2_8"):
    """A layer as CusparseltBackend.prepare leaves it (the compressed weight stood in by the
    padded slid weight, which the emulated GEMM multiplies)."""
    pat = parse_pattern(sparsity)
    kl = pat.lifted_k(K) + (-pat.lifted_k(K)) % cl.K_ALIGN
    layer = torch.nn.Module()
    layer.ss_w_compressed = (torch.randn(N, kl, generator=g) * 4).to(torch.float8_e4m3fn)
    layer.ss_w_dense = (torch.randn(N, K, generator=g) * 4).to(torch.float8_e4m3fn)
    layer.ss_w_scale = torch.rand(N, generator=g) + 0.5
    layer.ss_n, layer.ss_k, layer.ss_sparsity, layer.ss_act_dtype = N, K, pat.name, "fp8_e4m3"
    layer.ss_plan, layer.ss_has_dense = plan, sl.DENSE in sl.plan_kinds(plan)
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
