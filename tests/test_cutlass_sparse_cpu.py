"""CPU side of the CUTLASS sparse GEMM binding: it imports and reports itself unavailable in one
line without CUDA or a build; the compressed layout (a pure torch transform) round-trips and
matches CUTLASS's layout definition; the build script checks its inputs."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from slidesparse.kernels import cutlass_sparse as cs

try:
    from slidesparse.core.pattern import pack, parse_pattern, slide  # after the restructuring
except ImportError:
    from slidesparse.pattern import pack, parse_pattern, slide

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "tools" / "build_csrc.sh"


@pytest.fixture
def fresh_module(monkeypatch):
    """Forget the loaded library so that each test sees its own environment."""
    monkeypatch.setattr(cs, "_LIB", None)
    monkeypatch.setattr(cs, "_LIB_ERROR", None)
    return cs


def _slid(n, k, pattern, dtype, seed):
    """A random Z_L-pruned weight, slid: [n, K'] in dtype (no -0.0, like the converter writes)."""
    pat = parse_pattern(pattern)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, pat.padded_k(k), generator=g)
    if pat.L is not None:
        grp = w.view(n, -1, pat.group)
        drop = torch.rand(grp.shape, generator=g).argsort(-1)[..., :2]
        grp.scatter_(-1, drop, 0.0)
        # some groups with more zeros: windows with 0 or 1 non-zeros must round-trip too
        grp[: n // 4, ::3] = 0.0
    w = w[:, :k]
    if dtype == torch.int8:
        w = (w * 40).round().clamp(-127, 127).to(torch.int8)
    else:
        w = (w * 8).to(torch.float8_e4m3fn).float()
        w = torch.where(w == 0, torch.zeros_like(w), w).to(torch.float8_e4m3fn)
    return slide(w, pat)


def _bits(t):
    return t.view(torch.uint8)


# ----------------------------------------------------------------------------- unavailable cleanly

def test_reports_unavailable_in_one_line_when_not_built(fresh_module, monkeypatch, tmp_path):
    monkeypatch.setenv(cs.LIB_ENV, str(tmp_path / "missing.so"))
    assert cs.available() is False
    msg = cs.why_unavailable()
    assert msg and "\n" not in msg and "build_csrc.sh" in msg
    with pytest.raises(cs.CutlassSparseError, match="build_csrc.sh"):
        cs.configs(torch.int8)


def test_a_corrupt_library_is_reported_not_raised(fresh_module, monkeypatch, tmp_path):
    bad = tmp_path / "libslidesparse_cutlass.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv(cs.LIB_ENV, str(bad))
    assert cs.available() is False
    msg = cs.why_unavailable()
    assert msg.startswith("cannot load") and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_the_reason_names_the_gpu(fresh_module):
    msg = cs.why_unavailable()
    assert msg is not None and "\n" not in msg
    assert ("CUDA" in msg) or ("build_csrc.sh" in msg) or ("cannot load" in msg)


def test_compress_needs_cuda_and_a_2to4_weight():
    w = torch.zeros(64, 64, dtype=torch.int8)
    with pytest.raises(cs.CutlassSparseError, match="CUDA"):
        cs.compress(w)
    with pytest.raises(cs.CutlassSparseError, match="not supported"):
        cs.compress_packed(torch.zeros(8, 32, dtype=torch.bfloat16), torch.zeros(8, 8, dtype=torch.uint8))


def test_packed_shape_errors_are_one_line():
    vals = torch.zeros(16, 64, dtype=torch.int8)
    with pytest.raises(cs.CutlassSparseError, match="do not match"):
        cs.compress_packed(vals, torch.zeros(16, 3, dtype=torch.uint8))
    with pytest.raises(cs.CutlassSparseError, match="multiple of 8"):
        cs.compress_packed(torch.zeros(12, 64, dtype=torch.int8), torch.zeros(12, 16, dtype=torch.uint8))
    with pytest.raises(cs.CutlassSparseError, match="multiple of 32"):
        cs.compress_packed(vals, torch.zeros(16, 16, dtype=torch.uint8), k=144)


def test_config_options_parse_and_bad_ones_are_rejected():
    for bad in ("fp8_bf16_streamk_128x64x128_c1x1:fast", "x:sw3", "x:split", "x:split0"):
        with pytest.raises(cs.CutlassSparseError, match="option"):
            cs._parse_config(bad)
    assert cs._parse_config("x:split4") == ("x", dict(mode=1, splits=4, swizzle=1, raster=0))
    assert cs._parse_config("x:streamk:sw8") == ("x", dict(mode=2, splits=1, swizzle=8, raster=0))
    assert cs._parse_config("x:rastern:sw2") == ("x", dict(mode=0, splits=1, swizzle=2, raster=2))
    assert cs._parse_config("x") == ("x", dict(mode=0, splits=1, swizzle=1, raster=0))


# ----------------------------------------------------------------------------- the layout

@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("pattern", ["2_4", "2_6", "2_8", "2_10", "2_inf"])
def test_pack_bits_is_the_project_packed_format(dtype, pattern):
    ws = _slid(24, 200, pattern, dtype, seed=3)
    ref_v, ref_m = pack(ws, pattern)
    got_v, got_m = cs._pack_bits(ws)
    assert torch.equal(_bits(got_v), _bits(ref_v))
    assert torch.equal(got_m, ref_m)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("pattern,n,k", [("2_4", 64, 256), ("2_8", 72, 300), ("2_6", 200, 130), ("2_10", 8, 1000),
                                         ("2_inf", 136, 96)])
def test_compress_packed_round_trips(dtype, pattern, n, k):
    ws = _slid(n, k, pattern, dtype, seed=n + k)
    vals, meta = pack(ws, pattern)
    w = cs.compress_packed(vals, meta)
    kp = ws.shape[1]
    assert w.k == cs.padded_k(kp) and w.k % cs.K_ALIGN == 0 and w.n == n
    assert w.values.shape == (n, w.k // 2) and w.values.dtype == dtype
    assert w.meta.numel() == -(-n // 64) * 64 * (-(-w.k // 128) * 128) // 8
    dense = cs.decompress(w)
    assert torch.equal(_bits(dense[:, :kp]), _bits(ws))
    assert not bool(_bits(dense[:, kp:]).any())


def test_metadata_lands_where_cutlass_layout_puts_it():
    """Sm90GemmSparseConfig (8-bit, K-major): logical (row r, column c) -> the atom (64 x 128)
    at (r // 64, c // 128), atoms along M first, then along K (stride round_up(n, 64) * 128),
    row-major within the atom; one byte holds 8 logical columns, low nibble first."""
    n, k = 136, 384
    rows = torch.randint(0, 256, (n, k // 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    flat = cs.meta_to_cutlass(rows, n, k)
    n_al = 192
    assert flat.numel() == n_al * k // 8
    for r, c in [(0, 0), (1, 0), (0, 8), (63, 127), (64, 0), (70, 200), (135, 383), (100, 130), (5, 256)]:
        logical = (c // 128) * (n_al * 128) + (r // 64) * (64 * 128) + (r % 64) * 128 + (c % 128)
        assert flat[logical // 8] == rows[r, c // 8], (r, c)
    # padding rows and columns are zero (CUTLASS's compressor clears them too)
    back = flat.view(k // 128, n_al, 16)
    assert not bool(back[:, n:, :].any())
    assert torch.equal(cs.meta_from_cutlass(flat, n, k), rows)


def test_k_padding_is_explicit():
    ws = _slid(64, 96, "2_8", torch.int8, seed=1)  # K' = 144
    vals, meta = pack(ws, "2_8")
    assert cs.compress_packed(vals, meta).k == 192
    assert cs.compress_packed(vals, meta, k=160).k == 160
    with pytest.raises(cs.CutlassSparseError, match="at least"):
        cs.compress_packed(vals, meta, k=128)


# ----------------------------------------------------------------------------- build script

def _run_build(*args):
    return subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "NVCC": "/nonexistent/nvcc", "CUTLASS_INCLUDE": "/nonexistent"})


def test_build_script_dry_run_lists_one_sm90a_compile_per_config():
    r = _run_build("--dry-run")
    assert r.returncode == 0, r.stderr
    text = (ROOT / "csrc" / "ss_configs.h").read_text()
    count = int(text.split("#define SS_NUM_CONFIGS")[1].split()[0])
    compiles = [ln for ln in r.stdout.splitlines() if "-DSS_CFG_ID=" in ln]
    assert len(compiles) == count
    assert all("arch=compute_90a,code=sm_90a" in ln and "-Xptxas -v" in ln for ln in compiles)
    assert "-l:libcudart.so.13" in r.stdout


def test_build_script_rejects_a_bad_config_id_and_a_missing_toolchain():
    r = _run_build("--configs", "0,99", "--dry-run")
    assert r.returncode != 0 and "bad configuration id '99'" in r.stderr
    r = _run_build("--configs", "0")
    assert r.returncode != 0 and "nvcc not found" in r.stderr


# ----------------------------------------------------------------------------- a built library

def _built():
    path = cs.library_path()
    return path is not None and path.is_file()


@pytest.mark.skipif(not _built(), reason="library not built (bash tools/build_csrc.sh)")
def test_built_library_agrees_with_the_python_layout(fresh_module):
    lib = cs._lib()
    names = cs.configs(torch.float8_e4m3fn) + cs.configs(torch.int8)
    assert names and all(n.split(":")[0] in lib.index for n in names)
    assert all(n.startswith("fp8_bf16_") for n in cs.configs(torch.float8_e4m3fn))
    for m in (1, 256, 1024, 16384):
        assert cs.default_config(torch.int8, m) in cs.configs(torch.int8)
        assert cs.default_config(torch.float8_e4m3fn, m, torch.float16) in cs.configs(torch.float8_e4m3fn, torch.float16)
    assert not set(cs.plain_configs()) & {n.split(":")[0] for n in names}
    info = cs.config_info(names[0])
    assert info["tile_k"] >= 128 and info["smem_bytes"] > 0 and info["stages"] >= 2
    for n, kp in [(64, 64), (136, 4784), (200, 5376), (8, 28416)]:
        ws = torch.zeros(n, kp, dtype=torch.int8)
        w = cs.compress_packed(*pack(ws, "2_4"))
        assert lib.ss_values_bytes(n, w.k) == w.values.numel()
        assert lib.ss_meta_bytes(n, w.k) == w.meta.numel()


def test_the_native_lift_is_asked_for_only_where_it_can_run():
    """Without CUDA lift_available() says no (never raises), the GPU default falls back, and
    asking for the native lift by name is a one-line error that says how to get it."""
    from slidesparse.kernels.quant_slide import QuantSlideError, lift_codes
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    assert cs.lift_available() is False
    q = torch.randint(-128, 128, (5, 48), dtype=torch.int8)
    with pytest.raises(QuantSlideError, match="build_csrc.sh") as e:
        lift_codes(q, "2_8", 64, 16, impl="native")
    assert "\n" not in str(e.value)
    with pytest.raises(QuantSlideError, match="unknown impl"):
        lift_codes(q, "2_8", 64, 16, impl="cuda")
