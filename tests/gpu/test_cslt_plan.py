"""The plan-caching cuSPARSELt path must give exactly what torch's binding gives, and replay in
CUDA graphs (GPU host only)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _problem(n, kq, m, dtype, seed):
    from slidesparse.kernels import cusparselt as cl

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, kq, device="cuda", generator=g)
    w.view(n, -1, 4)[..., 1::2] = 0  # 2:4: keep positions 0 and 2 of every window
    x = torch.randn(m, kq, device="cuda", generator=g)
    if dtype == torch.int8:
        w, x = (w * 20).round().clamp(-127, 127), (x * 20).round().clamp(-127, 127)
    w, x = w.to(dtype), x.to(dtype).contiguous()
    return cl.compress(w), cl.padded_n(n), x


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("n,kq,m", [(3072, 2048, 16), (16384, 2048, 4096), (2048, 12288, 256), (96, 192, 16)])
def test_plan_matches_torch_binding_bit_for_bit(dtype, n, kq, m):
    from slidesparse.kernels import cslt_plan, cusparselt as cl

    wc, n_pad, x = _problem(n, kq, m, dtype, seed=n + m)
    for alg in (0, cl.search_alg(wc, x, torch.bfloat16)):
        ref = cl.sparse_mm(wc, x, torch.bfloat16, alg_id=alg)           # torch._cslt_sparse_mm
        got = cslt_plan.sparse_mm(wc, n_pad, x, torch.bfloat16, alg_id=alg)
        assert got.shape == ref.shape
        assert torch.equal(got, ref), f"alg {alg}: max diff {(got.float() - ref.float()).abs().max()}"


def test_plan_replays_in_a_cuda_graph():
    from slidesparse.kernels import cslt_plan, cusparselt as cl

    wc, n_pad, x = _problem(3072, 2048, 64, torch.float8_e4m3fn, seed=1)
    fn = lambda: cslt_plan.sparse_mm(wc, n_pad, x, torch.bfloat16)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    fresh = _problem(3072, 2048, 64, torch.float8_e4m3fn, seed=2)[2]
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cl.sparse_mm(wc, fresh, torch.bfloat16))
