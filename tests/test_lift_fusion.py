"""The lift fusion on the CPU: the producer kernels of kernels/fused_lift.py (their torch
definitions, and the Triton kernel under Triton's interpreter) and runtime/lift_fusion.py's pass,
which must fold each quant_lift into its producer in graphs shaped like vLLM's (vLLM IR RMSNorm,
decomposed SiLU*mul) and leave the results bit for bit what the unfused graph computes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from slidesparse.kernels import cusparselt as cl
from slidesparse.kernels import fused_lift as fl
from slidesparse.kernels import sparse_linear as sl
from slidesparse.kernels.reference import quant_slide_ref
from slidesparse.runtime import lift_fusion
from slidesparse.runtime.cusparselt_backend import CusparseltBackend

from test_sparse_linear import _emulated, _layer


def _ir():
    try:
        from vllm import ir
        import vllm.ir.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this vLLM has no IR ops: {e}")
    return ir


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("act", ("int8", "fp8_e4m3"))
def test_producer_definitions_are_the_producer_then_quant_slide(act):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(5, 72, generator=g) * 2).bfloat16(), torch.randn(5, 72, generator=g).bfloat16()
    w = (torch.rand(72, generator=g) + 0.5).bfloat16()
    q, s, h = fl.add_rms_norm_quant_lift(x, r, w, 1e-5, "2_8", act, 64, 16)
    y, h_ref = fl.add_rms_norm_ref(x, r, w, 1e-5)
    qr, sr = quant_slide_ref(y, "2_8", act, k_align=64)
    assert q.shape == (16, qr.shape[1]) and torch.equal(_bits(q[:5]), _bits(qr)) and torch.equal(s, sr)
    assert torch.equal(h, h_ref) and not q[5:].float().any()
    q, s = fl.silu_mul_quant_lift(torch.cat([x, r], 1), "2_6", act, 64, 1)
    qr, sr = quant_slide_ref(F.silu(x) * r, "2_6", act, k_align=64)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    q, s = fl.rms_norm_quant_lift(x, None, 1e-6, "2_10", act, 64, 1)
    qr, sr = quant_slide_ref(fl.rms_norm_ref(x, None, 1e-6), "2_10", act, k_align=64)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    with pytest.raises(ValueError, match="even last dimension"):
        fl.silu_mul_quant_lift(x[:, :71], "2_8", act)
    with pytest.raises(ValueError, match="does not match"):
        fl.add_rms_norm_quant_lift(x, r[:, :8], w, 1e-5, "2_8", act)


def test_producer_kernels_under_interpreter():
    """The Triton kernels against the torch definitions, through Triton's interpreter: the tile
    kernel (fp16: the interpreter truncates to bf16 where a GPU rounds) in one block and in
    several, with x from a GEMM accumulator (Dequant) too; the one-element-per-lane kernel (fp32).
    int8 codes (the interpreter's fp8 rounding is not the GPU's); they may differ by one step
    where 1/rms differs in its last bit."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from slidesparse.kernels import fused_lift as fl
        from slidesparse.kernels.fused_lift import Dequant
        g = torch.Generator().manual_seed(0)
        for sp in ("2_6", "2_8", "2_inf"):
            for m, k, dt in ((3, 40, torch.float16), (2, 4100, torch.float16), (2, 136, torch.float32)):
                x = (torch.randn(m, k, generator=g) * 2).to(dt)
                r = torch.randn(m, k, generator=g).to(dt)
                w = (torch.rand(k, generator=g) + 0.5).to(dt)
                t = torch.cat([x, r], 1)
                npad = -(-2 * k // 32) * 32
                acc = (torch.randn(m + 5, npad, generator=g) * 30).to(dt)
                st, sc = torch.rand(m, generator=g) * 0.1, torch.rand(npad, generator=g) * 0.1
                b = torch.randn(npad, generator=g).to(dt)
                d1 = Dequant(acc, st, sc[:k].contiguous(), b[:k].contiguous(), k, dt)
                d2 = Dequant(acc, st, sc[:2 * k].contiguous(), None, 2 * k, dt)
                cases = (("rms", lambda i: fl.rms_norm_quant_lift(x, w, 1e-6, sp, "int8", 64, 16, impl=i)),
                         ("rms_nw", lambda i: fl.rms_norm_quant_lift(x, None, 1e-6, sp, "int8", 64, 1, impl=i)),
                         ("add", lambda i: fl.add_rms_norm_quant_lift(x, r, w, 1e-5, sp, "int8", 64, 16, impl=i)),
                         ("silu", lambda i: fl.silu_mul_quant_lift(t, sp, "int8", 64, 16, impl=i)),
                         ("deq_add", lambda i: fl.add_rms_norm_quant_lift(d1, r, w, 1e-5, sp, "int8", 64, 16, impl=i)),
                         ("deq_silu", lambda i: fl.silu_mul_quant_lift(d2, sp, "int8", 64, 16, impl=i)))
                for name, fn in cases:
                    a, b_ = fn("triton"), fn("torch")
                    assert a[0].shape == b_[0].shape, (sp, k, name)
                    d = (a[0].int() - b_[0].int()).abs()
                    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (sp, k, dt, name, d.max())
                    torch.testing.assert_close(a[1], b_[1], rtol=1e-5, atol=0)
                    if "add" in name:
                        assert torch.equal(a[2], b_[2]), (sp, k, name)
                    assert not a[0][m:].any()
        print("interpreter ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "interpreter ok" in p.stdout, p.stderr[-3000:]


def test_producer_ops_have_consistent_fakes():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(7, 48, generator=g).bfloat16(), torch.randn(7, 48, generator=g).bfloat16()
    w = torch.rand(48, generator=g).bfloat16()
    ops = torch.ops.slidesparse
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.quant_lift.default, (x, "2_8", "int8", 64, 16), test_utils=tests)
    torch.library.opcheck(ops.rms_norm_quant_lift.default, (x, w, 1e-6, "2_8", "fp8", 64, 16), test_utils=tests)
    torch.library.opcheck(ops.add_rms_norm_quant_lift.default, (x, r, None, 1e-6, "2_6", "int8", 64, 1),
                          test_utils=tests)
    torch.library.opcheck(ops.silu_mul_quant_lift.default, (torch.cat([x, r], 1), "2_10", "int8", 64, 16),
                          test_utils=tests)


def _compiled_with_pass(f):
    # no FX graph cache: a cache hit would skip the pass, whose counts the tests read
    p = lift_fusion.LiftFusionPass()
    torch._dynamo.reset()
    return torch.compile(f, dynamic=True, fullgraph=True, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False}), p


def test_pass_folds_each_producer_and_keeps_the_bits():
    ir = _ir()
    ql = torch.ops.slidesparse.quant_lift

    def f(x, r, t, w):
        y, res = ir.ops.fused_add_rms_norm(x, r, w, 1e-6)
        l1, s1 = ql(y, "2_8", "int8", 64, 16)
        d = t.shape[-1] // 2
        l2, s2 = ql(F.silu(t[..., :d]) * t[..., d:], "2_8", "fp8_e4m3", 64, 16)
        l3, s3 = ql(ir.ops.rms_norm(x, w, 1e-6), "2_6", "int8", 64, 1)
        l4, s4 = ql(x * 2, "2_8", "int8", 64, 16)        # an opaque producer: stays
        y5 = ir.ops.rms_norm(r, w, 1e-6)
        l5, s5 = ql(y5, "2_8", "int8", 64, 16)           # the output has another user: stays
        return l1, s1, res + 1, l2, s2, l3, s3, l4, s4, l5, s5, y5 * 3

    g = torch.Generator().manual_seed(0)
    fc, p = _compiled_with_pass(f)
    for m in (5, 33):  # the second M reuses the dynamic graph
        x, r = torch.randn(m, 64, generator=g).bfloat16(), torch.randn(m, 64, generator=g).bfloat16()
        t, w = torch.randn(m, 96, generator=g).bfloat16(), torch.rand(64, generator=g).bfloat16() + 0.5
        for a, b in zip(f(x, r, t, w), fc(x, r, t, w)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    assert p.last == {"add_rms_norm": 1, "rms_norm": 1, "silu_mul": 1, "left": 2, "with_dequant": 0}


@pytest.mark.parametrize("plan", ([], [20, sl.CUTLASS, 0, 1, 65536, sl.SPARSE, 0, 1]))
def test_traced_lifted_layer_after_the_pass_equals_the_unfused_graph(monkeypatch, plan):
    """A decoder step as vLLM traces it (fused_add_rms_norm -> SlideSparse linear), through the
    real backend.apply: the pass turns the norm into add_rms_norm_quant_lift, and the output is
    bit for bit the unfused graph's and the reference composition's, at M the trace never saw.
    A CUTLASS bucket gets x' without the row padding of the cuSPARSELt buckets."""
    from slidesparse.kernels import cutlass_sparse as cs
    ir = _ir()
    _emulated(monkeypatch)
    seen = []

    def fake_cutlass(x_lifted, w, s_tok, s_ch, bias=None, out_dtype=torch.bfloat16, config=None):
        seen.append(x_lifted.shape[0])
        return ((x_lifted.float() @ w.values.float().T) * s_tok[:, None] * s_ch + bias.float()).to(out_dtype)
    monkeypatch.setattr(cs, "scaled_sparse_mm", fake_cutlass)
    g = torch.Generator().manual_seed(4)
    layer = _layer(plan, g)
    if plan:
        layer.ss_cw_values, layer.ss_cw_meta = layer.ss_w_compressed, torch.zeros(1, dtype=torch.uint8)
        layer.ss_cw_k, layer.ss_cutlass_configs = layer.ss_w_compressed.shape[1], "cfg"
    assert layer.ss_takes_lifted
    be = CusparseltBackend()
    w = (torch.rand(layer.ss_k, generator=g) + 0.5).bfloat16()
    bias = torch.randn(layer.ss_n, generator=g).bfloat16()

    def step(x, r):
        y, res = ir.ops.fused_add_rms_norm(x, r, w, 1e-6)
        return be.apply(layer, y, bias), res

    fused, p = _compiled_with_pass(step)
    torch._dynamo.reset()
    plain = torch.compile(step, dynamic=True, fullgraph=True)
    for m in (3, 17, 40):
        x, r = torch.randn(m, layer.ss_k, generator=g).bfloat16(), torch.randn(m, layer.ss_k, generator=g).bfloat16()
        (out, res), (out_p, res_p) = fused(x, r), plain(x, r)
        assert torch.equal(res, res_p) and torch.equal(out, out_p)
        y, _ = fl.add_rms_norm_ref(x, r, w, 1e-6)
        q, s = quant_slide_ref(y, layer.ss_sparsity, "fp8_e4m3", k_align=cl.K_ALIGN)
        acc = q.float() @ layer.ss_w_compressed.float().T
        if plan and m <= 20:
            ref = (acc * s[:, None] * layer.ss_w_scale + bias.float()).bfloat16()
        else:
            ref = (acc.bfloat16().float() * s[:, None] * layer.ss_w_scale + bias.float()).bfloat16()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    assert p.last == {"add_rms_norm": 1, "rms_norm": 0, "silu_mul": 0, "left": 0, "with_dequant": 0}
    assert seen == ([3, 3, 17, 17] if plan else [])


def test_pass_takes_the_previous_layers_dequant_into_the_producer(monkeypatch):
    """Two lifted layers in a row, as in a decoder (down -> residual add + RMSNorm -> gate_up ->
    SiLU*mul -> down): each producer absorbs the previous layer's dequant (no pass of its own is
    left). The result is bit for bit the reference composition of the definitions (the previous
    GEMM's scales and bias reach the right columns); the unfused graph is only close to it, as
    Inductor computes SiLU*mul without the bf16 roundings between the eager ops."""
    from slidesparse.kernels.reference import dequant_ref
    ir = _ir()
    _emulated(monkeypatch)
    g = torch.Generator().manual_seed(6)
    k, n_up = 96, 192
    a = _layer([], g, n=k, k=k)            # "down" of the previous layer: K -> K
    up = _layer([], g, n=n_up, k=k)        # gate_up: K -> 2 * 96
    down = _layer([], g, n=k, k=n_up // 2)
    be = CusparseltBackend()
    w = (torch.rand(k, generator=g) + 0.5).bfloat16()
    bias = torch.randn(n_up, generator=g).bfloat16() * 30

    def step(x, r):
        h = be.apply(a, x, None)
        y, res = ir.ops.fused_add_rms_norm(h, r, w, 1e-6)
        gu = be.apply(up, y, bias)
        d = gu.shape[-1] // 2
        return be.apply(down, F.silu(gu[..., :d]) * gu[..., d:], None), res

    def linear(layer, v, b):  # quant+lift, the emulated GEMM (bf16 accumulator), the dequant
        q, s = quant_slide_ref(v, layer.ss_sparsity, "fp8_e4m3", k_align=cl.K_ALIGN)
        acc = (q.float() @ layer.ss_w_compressed.float().T).bfloat16()
        return dequant_ref(acc[:, :layer.ss_n], s, layer.ss_w_scale, b, torch.bfloat16)

    def reference(x, r):
        y, res = fl.add_rms_norm_ref(linear(a, x, None), r, w, 1e-6)
        return linear(down, fl.silu_mul_ref(linear(up, y, bias)), None), res

    fused, p = _compiled_with_pass(step)
    torch._dynamo.reset()
    plain = torch.compile(step, dynamic=True, fullgraph=True)
    for m in (5, 19):
        x, r = torch.randn(m, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
        (o1, r1), (o2, r2), (o3, r3) = fused(x, r), plain(x, r), reference(x, r)
        assert torch.equal(r1, r3) and torch.equal(r2, r3) and torch.equal(o1, o3)
        assert float((o2.double() - o3.double()).norm() / o3.double().norm()) < 0.1
    assert p.last == {"add_rms_norm": 1, "rms_norm": 0, "silu_mul": 1, "left": 1, "with_dequant": 2}


def test_install_adds_the_pass_once_and_yields_to_a_foreign_one(monkeypatch):
    class Cfg:
        def __init__(self, d):
            self.inductor_compile_config = d
    monkeypatch.setenv(lift_fusion.ENV, "1")
    c = Cfg({})
    assert lift_fusion.install(c) is None
    holder = c.inductor_compile_config[lift_fusion.KEY]
    first = holder.get(lift_fusion.LiftFusionPass)
    assert isinstance(first, lift_fusion.LiftFusionPass) and len(holder.passes) == 1
    assert lift_fusion.install(c) is None and c.inductor_compile_config[lift_fusion.KEY] is holder
    assert holder.passes == [first]
    assert "another" in lift_fusion.install(Cfg({lift_fusion.KEY: object()}))
    for off in ("0", None):  # opt-in: unset is off
        if off is None:
            monkeypatch.delenv(lift_fusion.ENV)
        else:
            monkeypatch.setenv(lift_fusion.ENV, off)
        assert "not 1" in lift_fusion.install(Cfg({})) and not lift_fusion.lift_fusion_enabled()



def test_a_table_tuned_under_the_other_form_is_named(monkeypatch):
    """The tuner records the traced form in the table's policy; serving under the other one warns."""
    from slidesparse.tune.search import policy_text
    monkeypatch.setenv(lift_fusion.ENV, "1")
    tuned_on = policy_text((16, 256), "balanced", 0.05)
    assert tuned_on.endswith("lift fusion on") and lift_fusion.form_mismatch(tuned_on) is None
    monkeypatch.setenv(lift_fusion.ENV, "0")
    assert "measured with lift fusion on" in lift_fusion.form_mismatch(tuned_on)
    assert lift_fusion.form_mismatch(policy_text((16, 4096), "prefill", 0.05)) is None
    assert lift_fusion.form_mismatch("objective balanced (older table)") is None
