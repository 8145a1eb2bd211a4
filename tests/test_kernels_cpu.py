"""CPU-side tests of the GPU path: the kernels' index math, the torch fallbacks, the Triton kernels
under Triton's interpreter, tuning files, the backend's CPU import, and the benchmark report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slidesparse.pattern import lift_index, parse_pattern

PATTERNS = ("2_4", "2_6", "2_8", "2_10", "2_12", "2_inf")


@pytest.mark.parametrize("sp", PATTERNS)
@pytest.mark.parametrize("k", (1, 7, 8, 37, 120, 3584))
def test_kernel_index_math_matches_lift_index(sp, k):
    from slidesparse.kernels.quant_slide import lifted_src_index, padded_lifted_k
    pat = parse_pattern(sp)
    kq = padded_lifted_k(k, pat, 64)
    got = lifted_src_index(torch.arange(kq), k, pat.group, pat.windows)
    want = lift_index(k, pat)
    assert torch.equal(got[: want.numel()], want)
    assert bool((got[want.numel():] == -1).all())  # alignment padding reads nothing


@pytest.mark.parametrize("act", ("int8", "fp8_e4m3"))
def test_torch_impl_pads_and_matches_reference(act):
    from slidesparse.kernels.quant_slide import quant_only, quant_slide
    from slidesparse.kernels.reference import quant_ref, quant_slide_ref
    x = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, s = quant_slide(x, "2_8", act, k_align=64, m_align=16, impl="torch")
    qr, sr = quant_slide_ref(x, "2_8", act, k_align=64)
    assert q.shape == (16, qr.shape[1]) and qr.shape[1] % 64 == 0
    assert torch.equal(q[:5].float(), qr.float()) and torch.equal(s, sr)
    assert not bool(q[5:].float().any())
    q, s = quant_only(x, act, impl="torch")
    assert torch.equal(q.float(), quant_ref(x, act)[0].float())
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
        from slidesparse.pattern import lift
        g = torch.Generator().manual_seed(3)
        from slidesparse.kernels import quant_slide as qs
        from slidesparse.pattern import parse_pattern
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


def test_backend_imports_on_cpu_and_refuses_cpu_weights():
    from slidesparse.kernels.cusparselt_backend import CusparseltBackend
    from slidesparse.runtime.backends import BackendError, SlidWeight, _REGISTRY
    assert _REGISTRY["cusparselt"] is CusparseltBackend
    assert torch.ops.slidesparse.cusparselt_linear.default is not None
    sw = SlidWeight(parse_pattern("2_8"), 16, 32, "int8", "int8", torch.zeros(32, 24, dtype=torch.int8),
                    torch.ones(32))
    with pytest.raises(BackendError, match="CUDA"):
        CusparseltBackend().prepare(torch.nn.Module(), sw)


def test_tuning_file_parsing_and_bucket_choice(tmp_path):
    from slidesparse.kernels.cusparselt_backend import LayerPlan, load_tuning, lookup_entries
    from slidesparse.runtime.backends import BackendError
    good = {"format_version": 1, "device": "H100", "library": "x", "entries": [
        {"n": 64, "k_lifted": 96, "dtype": "int8", "m_max": 4096, "backend": "sparse", "alg_id": 2},
        {"n": 64, "k_lifted": 96, "dtype": "int8", "m_max": 16, "backend": "dense", "alg_id": 0},
        {"n": 64, "k_lifted": 96, "dtype": "fp8_e4m3", "m_max": 16, "backend": "sparse", "alg_id": 1}]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(good))
    rows = lookup_entries(load_tuning(p), 64, 96, "int8")
    assert [r["m_max"] for r in rows] == [16, 4096]
    plan = LayerPlan(parse_pattern("2_8"), 64, 64, 96, torch.int8, "int8", torch.bfloat16,
                     bounds=[16, 4096], choices=[("dense", 0, 1), ("sparse", 2, 1)])
    assert plan.choose(1) == ("dense", 0, 1) and plan.choose(16) == ("dense", 0, 1)
    assert plan.choose(17) == ("sparse", 2, 1) and plan.choose(10**6) == ("sparse", 2, 1)
    for bad in ("{", json.dumps({"entries": [{"n": 1}]}), json.dumps({"entries": [
            {"n": 1, "k_lifted": 1, "dtype": "int8", "m_max": 1, "backend": "gpu", "alg_id": 0}]})):
        p.write_text(bad)
        with pytest.raises(BackendError):
            load_tuning(p)


def test_presets_shapes():
    from slidesparse.bench.shapes import PresetError, linear_shapes
    assert linear_shapes("qwen2.5-7b") == {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
                                           "down": (3584, 18944)}
    assert linear_shapes("llama3.2-1b") == {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                                            "down": (2048, 8192)}
    with pytest.raises(PresetError):
        linear_shapes("gpt5")


def _synthetic_rows():
    rows = []
    for layer, (n, k) in {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}.items():
        for part, dense in (("gemm", 1.0), ("linear", 1.2)):
            rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant="dense",
                             part=part, ms=dense, impl="x", k_lifted=k, alg_id=0))
            for sp, f in (("2_4", 0.5), ("2_8", 0.8)):
                rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant=sp,
                                 part=part, ms=dense * f, impl="y", k_lifted=parse_pattern(sp).lifted_k(k), alg_id=0))
        rows.append(dict(preset="qwen2.5-7b", layer=layer, n=n, k=k, m=16384, dtype="fp8_e4m3", variant="2_8",
                         part="quant", ms=0.05, impl="t", k_lifted=parse_pattern("2_8").lifted_k(k), alg_id=0))
    return rows


def test_report_from_synthetic_rows(tmp_path):
    from slidesparse.bench import report
    rows = _synthetic_rows()
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_4") == pytest.approx(2.0)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "fp8_e4m3", "2_8") == pytest.approx(1.25)
    assert report.summed_speedup(rows, "qwen2.5-7b", 16384, "int8", "2_8") is None
    env = {"device": "TestGPU", "command": "slidesparse bench kernel", "copy_gbs": 3000.0,
           "cusparselt": 800, "cusparselt_loaded": 1000}
    paths = report.write_all(rows, env, tmp_path)
    md = (tmp_path / "kernel_bench.md").read_text()
    assert "| qwen2.5-7b | 16384 | fp8_e4m3 | 2_8 | 1.250x" in md and "not measured" in md
    # the library that ran, not only the one torch was built against (LD_PRELOAD can differ)
    assert "cuSPARSELt 1000 (torch built with 800)" in md
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert len(data["rows"]) == len(rows) and data["summary"]["targets"][1]["linear"] == pytest.approx(2.0)
    bw = report.quant_bandwidth(rows, 3000.0)
    m, k, kl = 16384, 3584, parse_pattern("2_8").lifted_k(3584)
    assert bw[0]["gbs"] == pytest.approx((m * k * 2 + m * kl + m * 4) / 0.05e-3 / 1e9)
    assert all(p.exists() for p in paths) and not list(tmp_path.glob("*.tmp*"))


def test_bench_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner
    from slidesparse.bench.cli import app
    r = CliRunner().invoke(app, ["kernel", "--report-only", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "error:" in r.output


def test_tune_rejects_non_checkpoints(tmp_path):
    from slidesparse.tune.search import TuneError, checkpoint_shapes
    with pytest.raises(TuneError, match="config.json"):
        checkpoint_shapes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(TuneError):
        checkpoint_shapes(tmp_path)


def test_tune_reads_a_converted_checkpoint(tmp_path):
    from slidesparse.convert.make_model import make_model
    from slidesparse.convert.pipeline import convert
    from slidesparse.tune.search import checkpoint_shapes
    make_model("tiny-qwen2", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "ckpt", sparsity="2_8", dtype="int8")
    cfg, shapes = checkpoint_shapes(tmp_path / "ckpt")
    assert cfg.sparsity == "2_8" and cfg.weight_dtype == "int8"
    # the layers vLLM builds: o (240, 240), down (240, 480), qkv 240+80+80, gate_up 2*480
    assert shapes == [(240, 240), (240, 480), (400, 240), (960, 240)]


def test_tune_shapes_follow_vllm_fusion_and_tp():
    from slidesparse.tune.search import runtime_shapes
    cfg = {"num_attention_heads": 32, "hidden_size": 2048, "head_dim": 64}      # Llama-3.2-1B
    proj = {}
    for i in range(2):
        p = f"model.layers.{i}."
        proj.update({p + "self_attn.q_proj": (2048, 2048), p + "self_attn.k_proj": (512, 2048),
                     p + "self_attn.v_proj": (512, 2048), p + "self_attn.o_proj": (2048, 2048),
                     p + "mlp.gate_proj": (8192, 2048), p + "mlp.up_proj": (8192, 2048),
                     p + "mlp.down_proj": (2048, 8192)})
    assert runtime_shapes(proj, cfg) == [(2048, 2048), (2048, 8192), (3072, 2048), (16384, 2048)]
    assert runtime_shapes(proj, cfg, tp=2) == [(1536, 2048), (2048, 1024), (2048, 4096), (8192, 2048)]
    # 8 KV heads over 16 ranks: each rank keeps one replicated head of 64 rows for k and for v
    assert (128 + 64 + 64, 2048) in runtime_shapes(proj, cfg, tp=16)



def test_traced_cusparselt_layer_routes_buckets(monkeypatch):
    """The layer as torch.compile traces it (quant(+slide) and dequant in torch ops around
    slidesparse::cusparselt_mm), on the CPU: the two GEMMs are emulated in float32, everything
    else is the real code. A small M takes the dense bucket, a large one the sparse GEMM; both
    must equal the eager reference composition, at M the trace never saw."""
    from slidesparse.kernels import cusparselt as cl
    from slidesparse.kernels import cusparselt_backend as cb
    from slidesparse.kernels.reference import dequant_ref, quant_ref, quant_slide_ref
    from slidesparse.pattern import parse_pattern
    pat, n, k = parse_pattern("2_8"), 64, 96
    g = torch.Generator().manual_seed(5)
    kl = pat.lifted_k(k) + (-pat.lifted_k(k)) % cl.K_ALIGN
    w_lifted = (torch.randn(n, kl, generator=g) * 4).to(torch.float8_e4m3fn)
    w_dense = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn)
    s_ch, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g).bfloat16()
    monkeypatch.setattr(cl, "sparse_mm", lambda wc, xq, out_dtype, alg_id=0, split_k=1, n=None:
                        (xq.float() @ wc.float().T).to(out_dtype))
    monkeypatch.setattr(cb, "_dense_unscaled", lambda p, xd: (xd.float() @ p.dense_weight.float().T).to(p.acc_dtype))
    plan = cb.LayerPlan(pattern=pat, n=n, k=k, k_lifted=pat.lifted_k(k), weight_dtype=torch.float8_e4m3fn,
                        act_dtype="fp8_e4m3", acc_dtype=torch.bfloat16, bounds=[20, 65536],
                        choices=[("dense", 0, 1), ("sparse", 0, 1)], dense_weight=w_dense)
    cb._PLANS.append(plan)
    layer = torch.nn.Module()
    layer.ss_w_compressed, layer.ss_w_scale, layer.ss_layer_id = w_lifted, s_ch, len(cb._PLANS) - 1
    f = torch.compile(lambda x: cb.CusparseltBackend().apply(layer, x, bias), dynamic=True, fullgraph=True)
    # M=17..20 pad to 32 rows: the bucket must follow the true M, as in eager mode
    for m, dense in ((3, True), (17, True), (20, True), (21, False), (300, False)):
        x = (torch.randn(1, m, k, generator=g) * 2).bfloat16()
        out = f(x)
        if dense:
            q, s = quant_ref(x[0], "fp8_e4m3")
            acc = (q.float() @ w_dense.float().T).bfloat16()
        else:
            q, s = quant_slide_ref(x[0], pat, "fp8_e4m3", k_align=cl.K_ALIGN)
            acc = (q.float() @ w_lifted.float().T).bfloat16()
        ref = dequant_ref(acc, s, s_ch, bias, torch.bfloat16)
        assert out.shape == (1, m, n)
        torch.testing.assert_close(out[0].float(), ref.float(), rtol=2 ** -7, atol=1e-3)


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
    from slidesparse.pattern import lift
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
