"""The `cusparselt` backend: fused Triton quant+slide -> cuSPARSELt 2:4 GEMM -> fused dequant+bias.

Under torch.compile (vLLM's default) the layer traces as per-token quantization and dequant in
torch ops around one opaque op, `slidesparse::cusparselt_mm` (lift the codes, then the GEMM), so
Inductor fuses the quantization into the op before and the dequantization into the op after
(docs/performance.md, "End to end").

prepare() (once, at load): pads the slid weight to the GEMM's alignment, compresses it with
cuSPARSELt, looks up the tuned algorithm per M bucket, and stores everything the op needs in a
per-layer record. apply() is one custom op, `slidesparse::cusparselt_linear`, opaque to
torch.compile and safe under CUDA-graph capture (no host sync, no allocation outside torch's
caching allocator, no plan state kept between calls).

Decode policy (docs/performance.md): the tuning file (slidesparse_tuning.json, written by
`slidesparse tune`) may mark small-M buckets "dense"; only then prepare() also keeps the unslid
weight (N*K more bytes for 8-bit) and those M run the dense GEMM of the dtype (torch._scaled_mm
for FP8, the Triton INT8 GEMM, F.linear for BF16/FP16). Without such entries nothing extra is kept.

This module imports without CUDA or Triton (the kernels are imported on first use), because
slidesparse.runtime.backends imports it on every machine.
"""

from __future__ import annotations

import bisect
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..pattern import Pattern, unslide
from ..quant import DTYPES
from ..runtime.backends import Backend, BackendError, SlidWeight, register_backend

ENV_TUNING = "SLIDESPARSE_TUNING"

__all__ = ["CusparseltBackend", "LayerPlan", "load_tuning", "set_tuning", "lookup_entries"]


@dataclass
class LayerPlan:
    pattern: Pattern
    n: int
    k: int
    k_lifted: int              # unpadded K' (the tuning key)
    weight_dtype: torch.dtype
    act_dtype: str | None
    acc_dtype: torch.dtype
    # ascending M bucket bounds and what to run there: ("sparse", alg_id, split_k) | ("dense", 0, 1)
    bounds: list[int] = field(default_factory=list)
    choices: list[tuple[str, int, int]] = field(default_factory=list)
    dense_weight: torch.Tensor | None = None
    # unit scales of the traced dense buckets (_dense_unscaled), made once with dense_weight
    one: torch.Tensor | None = None
    ones_n: torch.Tensor | None = None

    def choose(self, m: int) -> tuple[str, int, int]:
        if not self.bounds:
            return ("sparse", 0, 1)
        i = bisect.bisect_left(self.bounds, m)
        return self.choices[min(i, len(self.choices) - 1)]


_PLANS: list[LayerPlan] = []
_TUNING: dict | None = None
_UNTUNED: set = set()          # shapes already warned about


def set_tuning(table: dict | None) -> None:
    """Install a parsed tuning file (slidesparse.format.empty_tuning layout) for later prepare() calls."""
    global _TUNING
    _TUNING = table


def load_tuning(path: str | os.PathLike) -> dict:
    """Read and validate a tuning file; raise BackendError with a one-line reason if it is bad."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"cannot read tuning file {path}: {e}") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise BackendError(f"tuning file {path} has no 'entries' list")
    for i, e in enumerate(table["entries"]):
        need = ("n", "k_lifted", "dtype", "m_max", "backend", "alg_id")
        if not isinstance(e, dict) or any(key not in e for key in need):
            raise BackendError(f"tuning file {path}: entry {i} lacks one of {', '.join(need)}")
        if e["backend"] not in ("sparse", "dense"):
            raise BackendError(f"tuning file {path}: entry {i} has backend {e['backend']!r} (sparse|dense)")
    return table


def lookup_entries(table: dict | None, n: int, k_lifted: int, dtype: str) -> list[dict]:
    """The entries of one layer shape, sorted by m_max."""
    if not table:
        return []
    rows = [e for e in table.get("entries", []) if e["n"] == n and e["k_lifted"] == k_lifted and e["dtype"] == dtype]
    return sorted(rows, key=lambda e: e["m_max"])


def _tuning_for_prepare() -> dict | None:
    if _TUNING is not None:
        return _TUNING
    path = os.environ.get(ENV_TUNING)
    return load_tuning(path) if path else None


# ----------------------------------------------------------------------------- the op

def _run(x: torch.Tensor, wc: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
         layer_id: int) -> torch.Tensor:
    from . import cusparselt as cl
    from .dequant import dequant
    from .quant_slide import quant_only, quant_slide

    p = _PLANS[layer_id]
    x2 = x.reshape(-1, p.k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], p.n)
    kind, alg, split_k = p.choose(m)
    if kind == "dense" and p.dense_weight is not None:
        out = _dense(p, x2, w_scale, bias, quant_only)
    elif p.act_dtype is None:
        xq, _ = quant_slide(x2, p.pattern, None, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN, out_dtype=p.weight_dtype)
        acc = cl.sparse_mm(wc, xq, None, alg_id=alg, split_k=split_k, n=cl.padded_n(p.n))
        out = acc[:m, :p.n]
        out = out + bias.to(out.dtype) if bias is not None else out.contiguous()
    else:
        xq, s_tok = quant_slide(x2, p.pattern, p.act_dtype, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
        acc = cl.sparse_mm(wc, xq, p.acc_dtype, alg_id=alg, split_k=split_k, n=cl.padded_n(p.n))
        out = dequant(acc, s_tok, w_scale, bias, x.dtype, m=m, n=p.n)
    return out.to(x.dtype).reshape(*x.shape[:-1], p.n)


def _dense(p: LayerPlan, x2, w_scale, bias, quant_only):
    w = p.dense_weight
    if p.act_dtype is None:
        return torch.nn.functional.linear(x2.to(w.dtype), w, bias.to(w.dtype) if bias is not None else None)
    q, s = quant_only(x2, p.act_dtype)
    if p.act_dtype == "int8":
        from .int8_gemm import int8_linear
        return int8_linear(q, w, s, w_scale, bias, x2.dtype)
    out = torch._scaled_mm(q, w.t(), scale_a=s.view(-1, 1), scale_b=w_scale.view(1, -1), out_dtype=x2.dtype)
    return out + bias.to(out.dtype) if bias is not None else out


@torch.library.custom_op("slidesparse::cusparselt_linear", mutates_args=())
def cusparselt_linear(x: torch.Tensor, w_compressed: torch.Tensor, w_scale: torch.Tensor | None,
                      bias: torch.Tensor | None, layer_id: int) -> torch.Tensor:
    return _run(x, w_compressed, w_scale, bias, layer_id)


@cusparselt_linear.register_fake
def _(x, w_compressed, w_scale, bias, layer_id):
    return x.new_empty(*x.shape[:-1], _PLANS[layer_id].n)


def _dense_unscaled(p: LayerPlan, xd: torch.Tensor) -> torch.Tensor:
    """A dense bucket inside cusparselt_mm: the dense GEMM of x's codes with unit scales, so the
    caller's dequant applies the same s_tok * s_ch as on the sparse path."""
    if p.act_dtype == "int8":
        from .int8_gemm import int8_linear
        ones_m = torch.ones(xd.shape[0], dtype=torch.float32, device=xd.device)
        acc = int8_linear(xd, p.dense_weight, ones_m, p.ones_n, None, p.acc_dtype)
    else:
        acc = torch._scaled_mm(xd, p.dense_weight.t(), scale_a=p.one, scale_b=p.one, out_dtype=p.acc_dtype)
    from . import cusparselt as cl
    pad = cl.padded_n(p.n) - p.n
    return torch.nn.functional.pad(acc, (0, pad)) if pad else acc


@torch.library.custom_op("slidesparse::cusparselt_mm", mutates_args=())
def cusparselt_mm(x_codes: torch.Tensor, w_compressed: torch.Tensor, layer_id: int) -> torch.Tensor:
    """The GEMM alone, what the layer runs under torch.compile between quantization and dequant
    written as torch ops (CusparseltBackend.apply): x's codes [M, K] -> unscaled acc [M, N_pad]
    in the plan's accumulator dtype. M picks the bucket, as in eager mode. A sparse bucket lifts
    the codes first and pads M to the GEMM's alignment (lift_codes, 1-byte moves; 2_4 only pads,
    and only when M is not aligned); a dense bucket multiplies them as they are."""
    from . import cusparselt as cl
    from .quant_slide import lift_codes
    p = _PLANS[layer_id]
    m = x_codes.shape[0]
    kind, alg, split_k = p.choose(m)
    if kind == "dense" and p.dense_weight is not None:
        return _dense_unscaled(p, x_codes)
    x_lifted = lift_codes(x_codes, p.pattern, cl.K_ALIGN, cl.M_ALIGN, impl="triton" if x_codes.is_cuda else "torch")
    acc = cl.sparse_mm(w_compressed, x_lifted, p.acc_dtype, alg_id=alg, split_k=split_k, n=cl.padded_n(p.n))
    return acc[:m]


@cusparselt_mm.register_fake
def _(x_codes, w_compressed, layer_id):
    from . import cusparselt as cl
    p = _PLANS[layer_id]
    return x_codes.new_empty(x_codes.shape[0], cl.padded_n(p.n), dtype=p.acc_dtype)


def _prewarm_int8(plan: LayerPlan, scale) -> None:
    """The Triton INT8 GEMM autotunes per M bucket on first use, which synchronises: do it now,
    for every bucket a dense entry can reach, so nothing tunes inside a CUDA-graph capture."""
    if plan.act_dtype != "int8":
        return
    from .int8_gemm import int8_linear
    w = plan.dense_weight
    top = max(b for b, c in zip(plan.bounds, plan.choices) if c[0] == "dense")
    st = torch.ones(top, dtype=torch.float32, device=w.device)
    sc = scale.to(device=w.device, dtype=torch.float32)
    m = 16
    while True:
        int8_linear(torch.zeros(min(m, top), plan.k, dtype=torch.int8, device=w.device), w, st, sc, None,
                    torch.bfloat16)
        if m >= top:
            break
        m *= 2


def _check_algs(plan: LayerPlan, wc: torch.Tensor) -> None:
    """Run each tuned alg id once at load (cuSPARSELt rejects ids out of range for a problem): a
    bad id found now falls back to the default, with a warning, instead of failing mid-serving."""
    from . import cusparselt as cl
    kq = -(-plan.k_lifted // cl.K_ALIGN) * cl.K_ALIGN
    dt = plan.weight_dtype if plan.act_dtype is None else DTYPES[plan.act_dtype]
    probe = torch.zeros(cl.M_ALIGN, kq, dtype=torch.int8, device=wc.device).view(dt) if dt.itemsize == 1 \
        else torch.zeros(cl.M_ALIGN, kq, dtype=dt, device=wc.device)
    out_dt = plan.acc_dtype if plan.act_dtype is not None else None
    for i, (kind, alg, split_k) in enumerate(plan.choices):
        if kind != "sparse" or (alg == 0 and split_k == 1):
            continue
        try:
            cl.sparse_mm(wc, probe, out_dt, alg_id=alg, split_k=split_k, n=cl.padded_n(plan.n))
        except RuntimeError as e:
            warnings.warn(f"slidesparse: tuned cuSPARSELt alg {alg} (split_k {split_k}) does not run for "
                          f"N={plan.n} K'={plan.k_lifted}: {str(e).splitlines()[0]}; using the default")
            plan.choices[i] = ("sparse", 0, 1)


# ----------------------------------------------------------------------------- the backend

@register_backend
class CusparseltBackend(Backend):
    name = "cusparselt"

    def prepare(self, layer: torch.nn.Module, w: SlidWeight) -> None:
        from . import cusparselt as cl

        if not w.slid.is_cuda:
            raise BackendError("the cusparselt backend needs the layer's weights on a CUDA device")
        wdt = DTYPES[w.weight_dtype]
        k_lifted = w.pattern.lifted_k(w.in_features)
        if tuple(w.slid.shape) != (w.out_features, k_lifted):
            raise BackendError(f"slid weight has shape {tuple(w.slid.shape)}, expected "
                               f"({w.out_features}, {k_lifted}) for K={w.in_features} and {w.pattern.name}")
        plan = LayerPlan(pattern=w.pattern, n=w.out_features, k=w.in_features, k_lifted=k_lifted,
                         weight_dtype=wdt, act_dtype=w.act_dtype, acc_dtype=cl.acc_dtype_for(wdt))
        table = _tuning_for_prepare()
        entries = lookup_entries(table, plan.n, k_lifted, w.weight_dtype)
        if table is not None and not entries and (plan.n, k_lifted) not in _UNTUNED:
            _UNTUNED.add((plan.n, k_lifted))
            warnings.warn(f"slidesparse: the tuning file has no entry for N={plan.n} K'={k_lifted} "
                          f"({w.weight_dtype}); this layer runs cuSPARSELt's default algorithm at every M. "
                          f"Re-run `slidesparse tune CKPT --tp T` with the tensor-parallel size you serve with")
        for e in entries:
            plan.bounds.append(int(e["m_max"]))
            plan.choices.append((e["backend"], int(e["alg_id"]), int(e.get("split_k", 1) or 1)))
        if any(c[0] == "dense" for c in plan.choices):
            # the policy asked for the dense GEMM at some M: keep the unslid weight for it
            plan.dense_weight = unslide(w.slid.float(), w.pattern, w.in_features).to(w.slid.dtype).contiguous()
            plan.one = torch.ones((), dtype=torch.float32, device=w.slid.device)
            plan.ones_n = torch.ones(plan.n, dtype=torch.float32, device=w.slid.device)
            _prewarm_int8(plan, w.scale)
        wc = cl.compress(w.slid)
        _check_algs(plan, wc)
        layer.register_buffer("ss_w_compressed", wc, persistent=False)
        scale = w.scale.to(device=w.slid.device, dtype=torch.float32).contiguous() if w.scale is not None else None
        layer.register_buffer("ss_w_scale", scale, persistent=False)
        _PLANS.append(plan)
        layer.ss_layer_id = len(_PLANS) - 1

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = _PLANS[layer.ss_layer_id]
        if p.act_dtype is None or not torch.compiler.is_compiling():
            # eager: one op, the Triton quant+slide and dequant kernels around the GEMM
            return torch.ops.slidesparse.cusparselt_linear(x, layer.ss_w_compressed, layer.ss_w_scale, bias,
                                                           layer.ss_layer_id)
        # traced (vLLM compiles the model): per-token quantization and dequant as torch ops, which
        # Inductor fuses into the producer of x (RMSNorm, SiLU*mul) and into the consumer of the
        # output, as it does for vLLM's own dense FP8 path. The codes keep x's shape (no lift, no
        # row padding), so Inductor writes them from the kernel that reduces the row; the op lifts
        # and pads them only for a sparse bucket.
        from .dequant import dequant
        from .quant_slide import quant_only
        x2 = x.reshape(-1, p.k)
        codes, s_tok = quant_only(x2, p.act_dtype, impl="torch")
        acc = torch.ops.slidesparse.cusparselt_mm(codes, layer.ss_w_compressed, layer.ss_layer_id)
        out = dequant(acc, s_tok, layer.ss_w_scale, bias, x.dtype, m=x2.shape[0], n=p.n, impl="torch")
        return out.reshape(*x.shape[:-1], p.n)
