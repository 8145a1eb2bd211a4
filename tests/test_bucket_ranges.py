"""runtime/bucket_ranges.py on the CPU: which M a plan serves densely, the compile-range endpoints,
and the post-grad pass under real Inductor, with an out-variant test op standing in for vLLM's
cutlass_scaled_mm (its CUDA kernel is not on this machine; tests/gpu runs the real one). The
rewritten graph must compute what the op's dense bucket computes, with no op of ours left."""

from __future__ import annotations

import pytest
import torch

from slidesparse.kernels import sparse_linear as sl
from slidesparse.runtime import bucket_ranges as br
from slidesparse.runtime import post_grad
from slidesparse.runtime.cusparselt_backend import CusparseltBackend

from test_sparse_linear import K, N, _emulated, _expected, _layer

S, D, C = sl.SPARSE, sl.DENSE, sl.CUTLASS


def _plan(*buckets):
    return [v for m, kind in buckets for v in (m, kind, 0, 1)]


def test_dense_over_follows_choose():
    plan = _plan((256, S), (1024, D), (4096, D), (16384, C))
    for lo, hi in [(257, 1024), (300, 4096), (1025, 1025), (4096, 4096)]:
        assert br.dense_over(plan, lo, hi), (lo, hi)
    for lo, hi in [(1, 256), (256, 300), (1000, 5000), (4097, 8000), (20000, 70000), (5, 4)]:
        assert not br.dense_over(plan, lo, hi), (lo, hi)
    # the last bucket serves every larger M
    tail = _plan((512, S), (4096, D))
    assert br.dense_over(tail, 513, 10 ** 6) and not br.dense_over(tail, 512, 513)
    assert not br.dense_over([], 1, 1)  # an empty plan is sparse everywhere
    # agrees with choose() at every M
    for m in range(1, 20000, 37):
        assert br.dense_over(plan, m, m) == (sl.choose(plan, m)[0] == D), m


def test_endpoints_split_where_a_plan_switches_above_the_largest_graph():
    a = _plan((256, S), (512, S), (1024, D), (4096, D), (16384, C))
    b = _plan((64, D), (256, S), (16384, S))           # a switch below 512 only
    c = _plan((16384, D))                              # never switches
    assert br.switch_points([a, b, c], 0) == [64, 512, 4096]
    assert br.switch_points([a, b, c], 513) == [4096]
    assert br.endpoints([a, b, c], 512, [65536]) == [512, 4096, 65536]
    # only switches below the graphs: the graph range alone is split off
    assert br.endpoints([b], 512, [65536]) == [512, 65536]
    assert br.endpoints([c], 512, [65536]) == [65536]
    # nothing at or above max_num_batched_tokens (vLLM's last endpoint)
    assert br.endpoints([a], 512, [2048]) == [512, 2048]
    assert br.endpoints([a], 512, None) == [512, 4096]


_LIB = torch.library.Library("sstest_br", "FRAGMENT")
_LIB.define("scaled_mm(Tensor(a!) out, Tensor a, Tensor b, Tensor a_scales, Tensor b_scales, Tensor? bias) -> ()")
CALLS = []


def _scaled_mm(out, a, b, a_scales, b_scales, bias):
    # vLLM's CUTLASS GEMM's contract: b column-major [K, N], scales [M, 1] and [N, 1], bias in out's dtype
    assert b.stride(0) == 1 and a_scales.shape == (a.shape[0], 1) and b_scales.shape == (b.shape[1], 1)
    assert bias is None or bias.dtype == out.dtype
    CALLS.append(a.shape[0])
    r = (a.float() @ b.float()) * a_scales * b_scales.view(1, -1)
    out.copy_((r + (0.0 if bias is None else bias.float())).to(out.dtype))


_LIB.impl("scaled_mm", _scaled_mm, "CPU")
_LIB._register_fake("scaled_mm", lambda out, a, b, a_scales, b_scales, bias: None)


def _compiled(layer, bias, m_range, dynamic=True):
    p = br.BucketRangePass(torch.ops.sstest_br.scaled_mm.default, m_range=m_range)
    torch._dynamo.reset()
    # no FX graph cache: a hit would skip the pass, whose counts the tests read
    f = torch.compile(lambda x: CusparseltBackend().apply(layer, x, bias), dynamic=dynamic, fullgraph=True,
                      options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})
    return f, p


def _counting_dense(monkeypatch):
    from slidesparse.kernels import dense
    calls, inner = [], dense.dense_scaled_mm

    def counted(*a, **k):
        calls.append(a[0].shape[0])
        return inner(*a, **k)
    monkeypatch.setattr(dense, "dense_scaled_mm", counted)
    return calls


@pytest.mark.parametrize("bias_dtype", (torch.bfloat16, torch.float32))
def test_a_dense_range_runs_the_stock_op_and_keeps_the_result(monkeypatch, bias_dtype):
    _emulated(monkeypatch)
    op_dense = _counting_dense(monkeypatch)
    g = torch.Generator().manual_seed(3)
    layer = _layer(_plan((64, S), (4096, D), (65536, S)), g)
    bias = torch.randn(N, generator=g).to(bias_dtype)
    f, p = _compiled(layer, bias, (65, 4096))
    CALLS.clear()
    for m in (65, 300, 4096):
        x = (torch.randn(1, m, K, generator=g) * 2).bfloat16()
        out = f(x)
        assert out.shape == (1, m, N)
        torch.testing.assert_close(out[0].float(), _expected(layer, x[0], bias.bfloat16(), True).float(),
                                   rtol=2 ** -7, atol=1e-3)
    assert p.last == {"stock": 1, "kept": 0}
    assert CALLS == [65, 300, 4096] and not op_dense  # the stock op ran, our op's dense bucket did not


def test_the_rewrite_is_bit_for_bit_the_ops_dense_bucket(monkeypatch):
    """Same codes, same scales, same GEMM: the stock op in place of our op changes no bit."""
    _emulated(monkeypatch)
    from slidesparse.kernels import dense
    monkeypatch.setattr(dense, "dense_scaled_mm", lambda q, w, s_tok, s_ch, bias, out_dtype, kernel=None:
                        _stock_like(q, w, s_tok, s_ch, bias, out_dtype))
    g = torch.Generator().manual_seed(4)
    layer = _layer(_plan((16, S), (65536, D)), g)
    bias = torch.randn(N, generator=g).bfloat16()
    x = (torch.randn(1, 777, K, generator=g) * 2).bfloat16()
    f_op, p_op = _compiled(layer, bias, (1, 65536))     # spans the switch: the op stays
    y_op = f_op(x)
    f_st, p_st = _compiled(layer, bias, (17, 65536))
    y_st = f_st(x)
    assert p_op.last == {"stock": 0, "kept": 1} and p_st.last == {"stock": 1, "kept": 0}
    assert torch.equal(y_op, y_st)


def _stock_like(q, w, s_tok, s_ch, bias, out_dtype):
    out = torch.empty(q.shape[0], w.shape[0], dtype=out_dtype)
    _scaled_mm(out, q, w.t(), s_tok.view(-1, 1), s_ch.view(-1, 1), None if bias is None else bias.to(out_dtype))
    return out


def test_ranges_that_meet_a_sparse_bucket_keep_the_op(monkeypatch):
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(5)
    layer = _layer(_plan((64, S), (4096, D), (65536, S)), g)
    bias = torch.randn(N, generator=g).bfloat16()
    for rng in [(1, 512), (4000, 8192), (4097, 65536)]:
        f, p = _compiled(layer, bias, rng)
        for m in (max(rng[0], 3), min(rng[1], 5000)):
            x = (torch.randn(1, m, K, generator=g) * 2).bfloat16()
            dense_bucket = sl.choose(layer.ss_plan, m)[0] == D
            torch.testing.assert_close(f(x)[0].float(), _expected(layer, x[0], bias, dense_bucket).float(),
                                       rtol=2 ** -7, atol=1e-3)
        assert p.last == {"stock": 0, "kept": 1}, rng


def test_a_static_row_count_is_its_own_range(monkeypatch):
    """A compile for one size (vLLM's compile_sizes) sees M as a number: the rewrite follows it."""
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(6)
    layer = _layer(_plan((64, S), (4096, D), (65536, S)), g)
    bias = torch.randn(N, generator=g).bfloat16()
    x = (torch.randn(1, 100, K, generator=g) * 2).bfloat16()
    f, p = _compiled(layer, bias, (1, 65536), dynamic=False)
    torch.testing.assert_close(f(x)[0].float(), _expected(layer, x[0], bias, True).float(), rtol=2 ** -7, atol=1e-3)
    assert p.last == {"stock": 1, "kept": 0}


def test_without_a_range_nothing_is_rewritten(monkeypatch):
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(7)
    layer = _layer(_plan((64, S), (65536, D)), g)
    bias = torch.randn(N, generator=g).bfloat16()
    monkeypatch.setattr(br, "_vllm_range", lambda: None)
    f, p = _compiled(layer, bias, None)
    x = (torch.randn(1, 200, K, generator=g) * 2).bfloat16()
    torch.testing.assert_close(f(x)[0].float(), _expected(layer, x[0], bias, True).float(), rtol=2 ** -7, atol=1e-3)
    assert p.last == {"stock": 0, "kept": 0}


class _Cfg:
    def __init__(self, endpoints, graph_max=512):
        self.inductor_compile_config = {}
        self.compile_ranges_endpoints = endpoints
        self.max_cudagraph_capture_size = graph_max


def test_install_sets_endpoints_and_one_pass_beside_the_lift_fusion(monkeypatch):
    from slidesparse.runtime import lift_fusion
    monkeypatch.setattr(br, "stock_mm_op", lambda: torch.ops.sstest_br.scaled_mm.default)
    monkeypatch.setenv(lift_fusion.ENV, "1")
    c = _Cfg([65536])
    plans = [_plan((512, S), (4096, D), (16384, S)), _plan((16384, D))]
    assert lift_fusion.install(c) is None
    assert br.install(c, plans) is None
    holder = c.inductor_compile_config[post_grad.KEY]
    assert [type(q).__name__ for q in holder.passes] == ["BucketRangePass", "LiftFusionPass"]
    assert c.compile_ranges_endpoints == [512, 4096, 65536]  # 512: a switch; 4096: dense -> sparse
    assert br.install(c, plans) is None and len(holder.passes) == 2  # once
    # nothing to split: nothing installed, the ranges untouched
    c2 = _Cfg([65536])
    assert "no layer switches" in br.install(c2, [_plan((16384, D))])
    assert c2.compile_ranges_endpoints == [65536] and not c2.inductor_compile_config
    monkeypatch.setattr(br, "stock_mm_op", lambda: None)
    assert "not available" in br.install(_Cfg([65536]), plans)
    c3 = _Cfg([65536])
    c3.inductor_compile_config[post_grad.KEY] = object()
    monkeypatch.setattr(br, "stock_mm_op", lambda: torch.ops.sstest_br.scaled_mm.default)
    assert "another" in br.install(c3, plans) and c3.compile_ranges_endpoints == [65536]
