"""CPU tests of kernels/quant_slide.py (and the dequant kernel): the torch implementation
against the references, and the Triton kernels under Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch



@pytest.mark.parametrize("act", ("int8", "fp8_e4m3"))
def test_torch_impl_pads_and_matches_reference(act):
    from slidesparse.kernels.quant_slide import quant_slide
    from slidesparse.kernels.reference import quant_slide_ref
    x = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, s = quant_slide(x, "2_8", act, k_align=64, m_align=16, impl="torch")
    qr, sr = quant_slide_ref(x, "2_8", act, k_align=64)
    assert q.shape == (16, qr.shape[1]) and qr.shape[1] % 64 == 0
    assert torch.equal(q[:5].float(), qr.float()) and torch.equal(s, sr)
    assert not bool(q[5:].float().any())
    with pytest.raises(ValueError, match="unknown impl"):
        quant_slide(x, "2_8", act, impl="cuda")


def test_triton_kernels_under_interpreter():
    """Run the Triton kernels (int8, lift-only, dequant) on the CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from slidesparse.kernels.quant_slide import quant_slide
        from slidesparse.kernels.dequant import dequant
        from slidesparse.kernels.reference import quant_slide_ref, dequant_ref
        from slidesparse.core.pattern import lift
        g = torch.Generator().manual_seed(3)
        from slidesparse.kernels import quant_slide as qs
        from slidesparse.core.pattern import parse_pattern
        for sp in ("2_4", "2_6", "2_8", "2_10", "2_inf"):
            # 8200: the tile gather's two-pass path at 2_8, 2_10 and 2_inf
            for m, k, dt in ((3, 40, torch.bfloat16), (2, 130, torch.float16), (2, 131, torch.bfloat16),
                             (1, 8200, torch.bfloat16)):
                x = (torch.randn(m, k, generator=g) * 3).to(dt)
                qr, sr = quant_slide_ref(x, sp, "int8", k_align=64)
                for gather in ("tile", "elem"):
                    q, s = qs._launch(x, parse_pattern(sp), "int8", 64, 16, None, False, gather)
                    assert torch.equal(q[:m], qr) and torch.equal(s, sr) and not q[m:].any(), (sp, k, gather)
                q, s = quant_slide(x, sp, "int8", k_align=64, m_align=16)
                assert torch.equal(q[:m], qr) and torch.equal(s, sr), sp
                xl, _ = quant_slide(x.half(), sp, None, k_align=16)
                r = lift(x.half(), sp)
                assert torch.equal(xl[:, :r.shape[1]], r) and not xl[:, r.shape[1]:].any(), sp
        # lift_codes (the traced layer's sparse buckets): Triton pair gather == torch lift, and
        # == the fused kernel's bytes for int8 (the interpreter's fp8 rounding is not the GPU's)
        from slidesparse.kernels.quant_slide import lift_codes, quant_only
        for sp in ("2_4", "2_6", "2_8", "2_10", "2_inf"):
            for m, k in ((5, 48), (17, 132), (3, 8200)):
                x = (torch.randn(m, k, generator=g) * 3).bfloat16()
                for act in ("int8", "fp8"):
                    q, _ = quant_only(x, act, impl="torch")
                    l = lift_codes(q, sp, 64, 16)
                    assert l.shape[0] == -(-m // 16) * 16
                    assert torch.equal(l.view(torch.uint8), lift_codes(q, sp, 64, 16, impl="torch").view(torch.uint8))
                    if act == "int8":
                        assert torch.equal(l[:m], quant_slide_ref(x, sp, act, k_align=64)[0]), (sp, m, k)
                        assert not l[m:].any()
        acc = torch.randint(-3000, 3000, (37, 300), generator=g, dtype=torch.int32)
        st, sc, b = torch.rand(37, generator=g), torch.rand(300, generator=g), torch.randn(300, generator=g)
        o = dequant(acc.t().contiguous().t(), st, sc, b.bfloat16(), torch.bfloat16, m=30, n=290)
        r = dequant_ref(acc[:30, :290], st[:30], sc[:290], b[:290].bfloat16(), torch.float32)
        # the interpreter converts to bf16 by truncation (a GPU rounds to nearest): one full ulp
        assert ((o.float() - r).abs() <= 2**-7 * r.abs() + 1e-6).all()
        print("interpreter ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "interpreter ok" in p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize("sp", ["2_4", "2_6", "2_8", "2_10", "2_inf"])
def test_lift_codes_equals_quant_slide(sp):
    """Quantize in x's shape, then lift the codes (the traced layer) == quant+slide's bytes: the
    scale is per row and lifting only copies values. Odd K and padded rows included."""
    from slidesparse.kernels.quant_slide import lift_codes, quant_only
    from slidesparse.kernels.reference import quant_slide_ref
    g = torch.Generator().manual_seed(13)
    for m, k in ((5, 48), (3, 130), (17, 131), (4, 64)):
        x = (torch.randn(m, k, generator=g) * 3).bfloat16()
        for act in ("int8", "fp8"):
            q, s = quant_only(x, act, impl="torch")
            lifted = lift_codes(q, sp, 64, 16, impl="torch")
            qr, sr = quant_slide_ref(x, sp, act, k_align=64)
            assert lifted.dtype == qr.dtype and lifted.shape == (-(-m // 16) * 16, qr.shape[1])
            assert torch.equal(lifted[:m].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (m, k, act)
            assert not lifted[m:].view(torch.uint8).any()


@pytest.mark.parametrize("sp", ["2_4", "2_6", "2_8", "2_10", "2_inf"])
def test_torch_quant_slide_equals_reference(sp):
    """impl='torch' (views and a cat: what the runtime traces under torch.compile) writes the
    reference's bytes, zero padding rows and columns; compiled with dynamic M too."""
    from slidesparse.kernels.quant_slide import quant_slide
    from slidesparse.kernels.reference import quant_slide_ref
    from slidesparse.core.pattern import lift
    g = torch.Generator().manual_seed(11)
    for m, k, dt in ((5, 48, torch.bfloat16), (3, 130, torch.float16), (17, 131, torch.bfloat16)):
        x = (torch.randn(m, k, generator=g) * 3).to(dt)
        for act in ("int8", "fp8"):
            q, s = quant_slide(x, sp, act, k_align=64, m_align=16, impl="torch")
            qr, sr = quant_slide_ref(x, sp, act, k_align=64)
            assert q.shape == (-(-m // 16) * 16, qr.shape[1])
            assert torch.equal(q[:m].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (m, k, act)
            assert not q[m:].view(torch.uint8).any()
        xl, _ = quant_slide(x, sp, None, k_align=16, impl="torch")
        r = lift(x, sp)
        assert torch.equal(xl[:, :r.shape[1]], r) and not xl[:, r.shape[1]:].any()
    f = torch.compile(lambda x: quant_slide(x, sp, "fp8", k_align=64, m_align=16, impl="torch"), dynamic=True)
    for m in (3, 16, 40):
        x = (torch.randn(m, 200, generator=g) * 3).bfloat16()
        (q, s), (qr, sr) = f(x), quant_slide_ref(x, sp, "fp8", k_align=64)
        assert torch.equal(q[:m].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), m
