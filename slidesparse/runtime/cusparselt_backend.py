"""The `cusparselt` backend: the GPU linear of kernels/sparse_linear.py, prepared once per layer.

prepare() (once, at load) turns the layer's slid weight into what its buckets need: the
cuSPARSELt-compressed 2:4 weight when some bucket is sparse, the unslid weight when some bucket
is dense (the tuning table decides, per layer shape and M bucket; a layer the table does not know
runs the sparse GEMM everywhere), the per-channel scale, and the bucket plan. All of it is kept on
the layer: buffers for the tensors, plain attributes for the plan, which the custom ops receive as
arguments. Nothing is kept anywhere else, so a model's memory goes with its layers.

apply() picks the form by mode:
  eager (and BF16/FP16 weights)   slidesparse::sparse_linear: one op, Triton quant+slide fused
  traced by torch.compile         per-token quantization in torch ops, in x's shape, then
      every bucket sparse         slidesparse::sparse_mm and the dequant in torch ops, which
                                  Inductor fuses into the op that consumes the output
      some bucket dense           slidesparse::sparse_linear_codes, whose dense buckets run the
                                  dense GEMM with the scales in its epilogue (docs/performance.md)
      every bucket dense          stock vLLM's W8A8 linear, traced in (kernels/dense.py,
                                  stock_w8a8_linear): no op of ours, so no host cost of ours
      lifted pattern, no dense    slidesparse::quant_lift (x -> x', which runtime/lift_fusion.py
      bucket                      folds into x's producer), then sparse_mm_lifted and the dequant in
                                  torch ops, or sparse_linear_lifted where a bucket is CUTLASS

This module imports without CUDA or Triton (kernels are imported on first use): runtime.backends
imports it on every machine.
"""

from __future__ import annotations

import warnings

import torch

from ..core.pattern import unslide
from ..core.quant import DTYPES, quantize_rows
from ..core.tuning import TuningTable
from ..kernels import sparse_linear as sl
from ..kernels.dense import bind_stock_ops, stock_w8a8_linear
from ..kernels.reference import dequant_ref
from .backend import Backend, BackendError, SlidWeight
from .lift_fusion import form_mismatch, lift_fusion_enabled


def bucket_plan(table: TuningTable | None, n: int, k_lifted: int, dtype: str) -> tuple[list[int], list[str]]:
    """The flat (m_max, kind, alg_id, split_k) plan of one layer shape (kernels/sparse_linear.py),
    and the CUTLASS configurations its cutlass buckets index (their alg_id)."""
    plan: list[int] = []
    configs: list[str] = []
    for e in (table.buckets(n, k_lifted, dtype) if table is not None else ()):
        alg = e.alg_id
        if e.backend == "cutlass":
            if e.config not in configs:
                configs.append(e.config)
            alg = configs.index(e.config)
        plan += [e.m_max, sl.KINDS[e.backend], alg, e.split_k]
    return plan, configs


def _cutlass_usable(plan: list[int], configs: list[str], dtype: torch.dtype, n: int,
                    quantized: bool) -> tuple[list[int], str | None]:
    """Cutlass buckets whose kernel cannot run here (library not built or loadable, a configuration
    it lacks, unquantized activations, N not a multiple of 8) fall back to cuSPARSELt's default,
    with the reason; the plan is otherwise unchanged."""
    from ..kernels import cutlass_sparse as cs
    kinds = plan[1::4]
    if sl.CUTLASS not in kinds:
        return plan, None
    why = ("it takes FP8 / INT8 activations only" if not quantized else
           f"N={n} is not a multiple of {cs.N_ALIGN}" if n % cs.N_ALIGN else cs.why_unavailable())
    if why is None:
        have = set(cs.configs(dtype))
        missing = [c for c in configs if c not in have]
        why = f"configuration {missing[0]} is not in this build" if missing else None
    if why is None:
        return plan, None
    plan = list(plan)
    for i in range(1, len(plan), 4):
        if plan[i] == sl.CUTLASS:
            plan[i: i + 3] = [sl.SPARSE, 0, 1]
    return plan, why


def _check_algs(plan: list[int], wc: torch.Tensor, n: int, k_lifted: int, act_dtype: str | None,
                weight_dtype: torch.dtype) -> list[int]:
    """Run each tuned alg id once at load (cuSPARSELt rejects ids out of range for a problem): a
    bad id found now falls back to the default, with a warning, instead of failing mid-serving."""
    from ..kernels import cusparselt as cl
    kq = -(-k_lifted // cl.K_ALIGN) * cl.K_ALIGN
    dt = weight_dtype if act_dtype is None else DTYPES[act_dtype]
    probe = torch.zeros(cl.M_ALIGN, kq, dtype=torch.int8, device=wc.device).view(dt) if dt.itemsize == 1 \
        else torch.zeros(cl.M_ALIGN, kq, dtype=dt, device=wc.device)
    out_dt = cl.acc_dtype_for(dt) if act_dtype is not None else None
    plan = list(plan)
    for i in range(0, len(plan), 4):
        kind, alg, split_k = plan[i + 1: i + 4]
        if kind != sl.SPARSE or (alg == 0 and split_k == 1):
            continue
        try:
            cl.sparse_mm(wc, probe, out_dt, alg_id=alg, split_k=split_k, n=cl.padded_n(n))
        except RuntimeError as e:
            warnings.warn(f"slidesparse: tuned cuSPARSELt alg {alg} (split_k {split_k}) does not run for "
                          f"N={n} K'={k_lifted}: {str(e).splitlines()[0]}; using the default")
            plan[i + 2: i + 4] = [0, 1]
    return plan


def _prewarm_triton_int8(plan: list[int], w_dense: torch.Tensor, scale: torch.Tensor) -> None:
    """The Triton INT8 GEMM (the dense stand-in where vLLM's CUTLASS kernel is not importable)
    autotunes per M bucket on first use, which synchronises: do it now, for every M a dense
    bucket can reach, so nothing tunes inside a CUDA-graph capture."""
    from ..kernels.int8_gemm import int8_linear
    top = max(plan[i] for i in range(0, len(plan), 4) if plan[i + 1] == sl.DENSE)
    k = w_dense.shape[1]
    ones = torch.ones(top, dtype=torch.float32, device=w_dense.device)
    m = 16
    while True:
        int8_linear(torch.zeros(min(m, top), k, dtype=torch.int8, device=w_dense.device), w_dense, ones, scale,
                    None, torch.bfloat16)
        if m >= top:
            break
        m *= 2


class CusparseltBackend(Backend):
    name = "cusparselt"

    def __init__(self, tuning: TuningTable | None = None):
        self.tuning = tuning
        self._warned: set[tuple] = set()   # warnings already given (untuned shapes, ...), per model

    def prepare(self, layer: torch.nn.Module, w: SlidWeight) -> None:
        from ..kernels import cusparselt as cl
        from ..kernels.dense import dense_kernel

        if not w.slid.is_cuda:
            raise BackendError("the cusparselt backend needs the layer's weights on a CUDA device")
        n, k = w.out_features, w.in_features
        k_lifted = w.pattern.lifted_k(k)
        if tuple(w.slid.shape) != (n, k_lifted):
            raise BackendError(f"slid weight has shape {tuple(w.slid.shape)}, expected ({n}, {k_lifted}) for "
                               f"K={k} and {w.pattern.name}")
        why_form = form_mismatch(self.tuning.policy) if self.tuning is not None and w.pattern.L != 4 else None
        if why_form and "form" not in self._warned:
            self._warned.add("form")
            warnings.warn(f"slidesparse: {why_form}")
        plan, configs = bucket_plan(self.tuning, n, k_lifted, w.weight_dtype)
        plan, why = _cutlass_usable(plan, configs, DTYPES[w.weight_dtype], n, w.act_dtype is not None)
        if why and ("cutlass", why) not in self._warned:
            self._warned.add(("cutlass", why))
            warnings.warn(f"slidesparse: the tuning table asks for SlideSparse's CUTLASS kernel, which cannot run "
                          f"here ({why}); those buckets use cuSPARSELt")
        if self.tuning is not None and not plan and (n, k_lifted) not in self._warned:
            self._warned.add((n, k_lifted))
            warnings.warn(f"slidesparse: the tuning file has no entry for N={n} K'={k_lifted} ({w.weight_dtype}); "
                          f"this layer runs cuSPARSELt's default algorithm at every M. Re-run "
                          f"`slidesparse tune CKPT --tp T` with the tensor-parallel size you serve with")
        kinds = sl.plan_kinds(plan)
        scale = w.scale.to(device=w.slid.device, dtype=torch.float32).contiguous() if w.scale is not None else None
        w_dense = wc = cw = None
        if sl.CUTLASS in kinds:
            from ..kernels import cutlass_sparse as cs
            cw = cs.compress(w.slid)
        if sl.DENSE in kinds:
            # through float32: fp8 has no comparison kernels on CUDA (unslide normalises -0.0)
            w_dense = unslide(w.slid.float(), w.pattern, k).to(w.slid.dtype).contiguous()
            if w.act_dtype == "int8" and dense_kernel("int8", w_dense.device) == "triton_int8":
                _prewarm_triton_int8(plan, w_dense, scale)
        if sl.SPARSE in kinds:
            wc = cl.compress(w.slid)
            plan = _check_algs(plan, wc, n, k_lifted, w.act_dtype, DTYPES[w.weight_dtype])
        layer.register_buffer("ss_w_compressed", wc, persistent=False)
        layer.register_buffer("ss_w_dense", w_dense, persistent=False)
        layer.register_buffer("ss_w_scale", scale, persistent=False)
        layer.register_buffer("ss_cw_values", None if cw is None else cw.values, persistent=False)
        layer.register_buffer("ss_cw_meta", None if cw is None else cw.meta, persistent=False)
        layer.ss_cw_k = 0 if cw is None else cw.k
        layer.ss_cutlass_configs = ";".join(configs)
        # plain attributes: apply() passes them to the ops as constants, so the schema stays static
        layer.ss_n, layer.ss_k, layer.ss_sparsity = n, k, w.pattern.name
        layer.ss_act_dtype = w.act_dtype or ""
        layer.ss_plan = plan
        # a dense or CUTLASS bucket finishes the output inside the op (scales in its epilogue)
        layer.ss_finishes = bool(kinds & {sl.DENSE, sl.CUTLASS})
        # traced, a lifted pattern with no dense bucket takes x' straight from x's producer
        # (runtime/lift_fusion.py); a dense bucket needs the unlifted codes, 2_4 has no lift
        layer.ss_takes_lifted = (w.act_dtype is not None and w.pattern.L != 4 and sl.DENSE not in kinds
                                 and lift_fusion_enabled())
        layer.ss_k_align = cl.K_ALIGN
        layer.ss_m_align = cl.M_ALIGN if sl.SPARSE in kinds else 1
        # traced, a layer that is dense at every M is stock vLLM's layer: its quantization and GEMM
        # traced straight into the graph (kernels/dense.py, stock_w8a8_linear)
        layer.ss_stock_dense = (w.act_dtype is not None and kinds == {sl.DENSE}
                                and bind_stock_ops(w_dense.device))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, act = layer.ss_n, layer.ss_act_dtype
        if not act or not torch.compiler.is_compiling():
            return torch.ops.slidesparse.sparse_linear(x, layer.ss_w_compressed, layer.ss_w_scale, bias,
                                                       layer.ss_w_dense, n, layer.ss_sparsity, act, layer.ss_plan,
                                                       layer.ss_cw_values, layer.ss_cw_meta, layer.ss_cw_k,
                                                       layer.ss_cutlass_configs)
        x2 = x if x.dim() == 2 else x.reshape(-1, layer.ss_k)
        if layer.ss_stock_dense:
            return stock_w8a8_linear(x2, layer.ss_w_dense, layer.ss_w_scale, bias, act,
                                     x.dtype).reshape(*x.shape[:-1], n)
        if layer.ss_takes_lifted:
            # one op from x to x', which the lift-fusion pass folds into x's producer
            lifted, s_tok = torch.ops.slidesparse.quant_lift(x2, layer.ss_sparsity, act, layer.ss_k_align,
                                                             layer.ss_m_align)
            return self.apply_lifted(layer, lifted, s_tok, bias, x.dtype).reshape(*x.shape[:-1], n)
        # the codes keep x's shape (no lift, no row padding), so Inductor writes them from the
        # kernel that reduces the row; the ops lift and pad them only where a sparse GEMM runs
        codes, s_tok = quantize_rows(x2, act)
        if layer.ss_finishes:
            out = torch.ops.slidesparse.sparse_linear_codes(codes, s_tok, layer.ss_w_compressed, layer.ss_w_scale,
                                                            bias, layer.ss_w_dense, n, layer.ss_sparsity,
                                                            layer.ss_plan, x.dtype, layer.ss_cw_values,
                                                            layer.ss_cw_meta, layer.ss_cw_k, layer.ss_cutlass_configs)
        else:
            acc = torch.ops.slidesparse.sparse_mm(codes, layer.ss_w_compressed, n, layer.ss_sparsity, layer.ss_plan)
            out = dequant_ref(acc[:, :n], s_tok, layer.ss_w_scale, bias, x.dtype)
        return out.reshape(*x.shape[:-1], n)

    def apply_lifted(self, layer: torch.nn.Module, lifted: torch.Tensor, s_tok: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """x' [M_pad, K'_pad] and s_tok [M] from a producer (kernels/fused_lift.py) -> [M, N]."""
        n = layer.ss_n
        if layer.ss_finishes:
            return torch.ops.slidesparse.sparse_linear_lifted(lifted, s_tok, layer.ss_w_compressed, layer.ss_w_scale,
                                                              bias, n, layer.ss_plan, out_dtype, layer.ss_cw_values,
                                                              layer.ss_cw_meta, layer.ss_cw_k, layer.ss_cutlass_configs)
        acc = torch.ops.slidesparse.sparse_mm_lifted(lifted, layer.ss_w_compressed, n, layer.ss_plan)
        return dequant_ref(acc[:s_tok.shape[0], :n], s_tok, layer.ss_w_scale, bias, out_dtype)
