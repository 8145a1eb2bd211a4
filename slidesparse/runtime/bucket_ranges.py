"""Dense buckets run as stock vLLM's layer, through vLLM's compile ranges.

A traced layer whose plan mixes dense buckets with sparse or CUTLASS ones is one op of ours,
slidesparse::sparse_linear_codes, which picks the bucket from M at run time. Inside a CUDA graph
that choice costs nothing, but vLLM captures graphs only up to max_cudagraph_capture_size (512 by
default): above it every step launches the compiled code from Python, and each call of our op
costs host time that stock vLLM's layer does not. On a small model that host time is the step time
(Llama-3.2-1B prefill at M = 1024-4096 on the H200, docs/performance.md).

vLLM compiles one graph per compile range (CompilationConfig.compile_ranges_endpoints), and its
post-grad passes know which range they compile. So:

1. install() adds an endpoint wherever a layer's plan switches between dense and not dense above
   the largest CUDA graph (and the largest graph size itself), so each range above it lies inside
   one run of dense or of non-dense buckets of every layer;
2. BucketRangePass, in each range's compile, replaces every sparse_linear_codes node whose plan is
   dense over the whole range by stock vLLM's cutlass_scaled_mm on the same codes and scales:
   what the op's dense bucket runs, with no op of ours around it.

The rewrite depends only on the node's own plan and the range, never on the endpoints: a range
that spans a switch keeps the op. A range costs one more Inductor compile at start-up; only
switches add ranges.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from pathlib import Path

import torch
from torch import fx

from ..kernels import sparse_linear as sl
from . import post_grad
from .post_grad import val as _val

_log = logging.getLogger("vllm.slidesparse.bucket_ranges")  # under vLLM's logger: its handlers show it

aten, prims = torch.ops.aten, torch.ops.prims


def dense_over(plan: list[int], lo: int, hi: int) -> bool:
    """Whether every M in [lo, hi] runs a DENSE bucket of plan (kernels/sparse_linear.choose: the
    first bucket with m_max >= M, the last one also for larger M)."""
    if not plan or lo > hi:
        return False
    bounds, kinds = plan[0::4], plan[1::4]
    below = 0
    for i, (top, kind) in enumerate(zip(bounds, kinds)):
        last = i == len(bounds) - 1
        if hi > below and (last or lo <= top) and kind != sl.DENSE:  # the bucket (below, top] meets [lo, hi]
            return False
        below = top
    return True


def switch_points(plans, above: int) -> list[int]:
    """M values e >= above where some plan's bucket serving e is dense and the one serving e + 1
    is not, or the other way round."""
    out = set()
    for plan in plans:
        bounds, kinds = plan[0::4], plan[1::4]
        for i in range(len(bounds) - 1):
            if (kinds[i] == sl.DENSE) != (kinds[i + 1] == sl.DENSE) and bounds[i] >= above:
                out.add(bounds[i])
    return sorted(out)


def endpoints(plans, graph_max: int, current: list[int] | None) -> list[int]:
    """The compile-range endpoints with the plans' switches added: every switch above graph_max,
    and graph_max itself where some switch lies below it (the range of CUDA-graph sizes keeps the
    op's own dispatch), below the largest endpoint vLLM set (max_num_batched_tokens)."""
    cur = sorted(set(current or []))
    top = cur[-1] if cur else None
    pts = switch_points(plans, graph_max)
    if pts or switch_points(plans, 0):
        pts.append(graph_max)
    return sorted(set(cur) | {e for e in pts if e > 1 and (top is None or e < top)})


def _vllm_range() -> tuple[int, int] | None:
    """The (start, end) rows of the compile range vLLM's pass manager is compiling, or None."""
    mod = post_grad.vllm_pass_module()
    try:
        r = mod.get_pass_context().compile_range
        return int(r.start), int(r.end)
    except Exception:  # noqa: BLE001  (no vLLM, no context: nothing to specialize for)
        return None


class BucketRangePass(post_grad.pass_base()):
    """Post-grad pass (see the module docstring).

    mm_op: the stock dense GEMM, an out-variant op with the schema of vLLM's
    `_C.cutlass_scaled_mm(Tensor! out, Tensor a, Tensor b, Tensor a_scales, Tensor b_scales,
    Tensor? bias)`; m_range: the (lo, hi) rows this compile serves, or None to ask vLLM's pass
    context. Counts what it did on `last`."""

    def __init__(self, mm_op, m_range: tuple[int, int] | None = None) -> None:
        self.mm_op = mm_op
        self.m_range = m_range
        self.last: dict[str, int] = {}

    def uuid(self) -> str:
        # Inductor's cache key for the pass: its source and the op it inserts (vLLM's pass manager
        # adds the compile range to its own key)
        return hashlib.sha256(Path(__file__).read_bytes() + str(self.mm_op).encode()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        target = getattr(torch.ops.slidesparse, "sparse_linear_codes", None)
        rng = self.m_range or _vllm_range()
        count = {"stock": 0, "kept": 0}
        if target is None or rng is None:
            self.last = count
            return
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is target.default:
                count["stock" if self._rewrite(graph, node, rng) else "kept"] += 1
        self.last = count
        if count["stock"]:
            _log.info("slidesparse bucket ranges: M %d-%d: %d layer(s) as stock vLLM's dense GEMM, %d kept",
                      rng[0], rng[1], count["stock"], count["kept"])

    def _rewrite(self, graph: fx.Graph, node: fx.Node, rng: tuple[int, int]) -> bool:
        a = _named_args(node)
        if a is None or not dense_over(list(a["plan"]), *_rows(a["codes"], rng)):
            return False
        codes, s_tok, w_dense, w_scale, bias = a["codes"], a["s_tok"], a["w_dense"], a["w_scale"], a["bias"]
        out_val = _val(node)
        if not isinstance(w_dense, fx.Node) or out_val is None:
            return False
        out_dtype = a["out_dtype"]
        fake = post_grad.fake_mode(node.args)
        with graph.inserting_before(node):
            def call(op, args, kwargs=None, val=None):
                n = graph.call_function(op, args, kwargs or {})
                if val is not None:
                    n.meta["val"] = val
                elif fake is not None:
                    with fake:
                        n.meta["val"] = op(*fx.map_arg(args, _val), **fx.map_arg(kwargs or {}, _val))
                return n
            # vLLM's CUTLASS GEMM takes the weight column-major and the scales as [M, 1] and [N, 1]
            b = call(aten.permute.default, (w_dense, [1, 0]))
            sa = call(aten.unsqueeze.default, (s_tok, 1)) if _val(s_tok).dim() == 1 else s_tok
            sb = call(aten.unsqueeze.default, (w_scale, 1)) if _val(w_scale).dim() == 1 else w_scale
            if bias is not None and _val(bias).dtype != out_dtype:
                bias = call(prims.convert_element_type.default, (bias, out_dtype))
            m = out_val.shape[0]
            m_arg = m if isinstance(m, int) else call(aten.sym_size.int, (codes, 0), val=m)
            out = call(aten.empty.memory_format, ([m_arg, out_val.shape[1]],),
                       {"dtype": out_dtype, "device": out_val.device, "pin_memory": False}, val=out_val)
            names = [x.name for x in self.mm_op._schema.arguments]
            kw = dict(zip(names, (out, codes, b, sa, sb, bias)))
            af = call(torch.ops.higher_order.auto_functionalized, (self.mm_op,), kw, val=(None, out_val))
            res = call(operator.getitem, (af, 1), val=out_val)
        node.replace_all_uses_with(res)
        graph.erase_node(node)
        return True


_ARG_NAMES = ("codes", "s_tok", "w_compressed", "w_scale", "bias", "w_dense", "n", "sparsity", "plan", "out_dtype",
              "cw_values", "cw_meta", "cw_k", "cutlass_configs")


def _named_args(node: fx.Node) -> dict | None:
    names = [x.name for x in node.target._schema.arguments]
    if tuple(names) != _ARG_NAMES:
        return None  # another version of the op: leave it
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    return a if len(a) == len(names) else None


def _rows(codes: fx.Node, rng: tuple[int, int]) -> tuple[int, int]:
    """The M values this compile can see: a static row count, or the range where M is the range's
    own symbol (vLLM's token count); anything else: an empty range (no rewrite)."""
    m = _val(codes).shape[0]
    if isinstance(m, int):
        return m, m
    expr = getattr(getattr(m, "node", None), "expr", None)
    if expr is not None and getattr(expr, "is_Symbol", False):
        return rng
    return 1, 0


def stock_mm_op():
    """Stock vLLM's `_C.cutlass_scaled_mm` where it runs (CUDA, vLLM importable), else None."""
    from ..kernels.dense import bind_stock_ops
    return torch.ops._C.cutlass_scaled_mm.default if bind_stock_ops("cuda") else None


def install(compilation_config, plans) -> str | None:
    """Add the plans' switch points to the compile ranges and the pass to the compilation config
    (before the model's backend copies it). Returns why nothing was installed, or None."""
    plans = [list(p) for p in plans if p]
    if not switch_points(plans, 0):
        return "no layer switches between dense and sparse buckets"
    mm = stock_mm_op()
    if mm is None:
        return "stock vLLM's cutlass_scaled_mm is not available"
    graph_max = int(getattr(compilation_config, "max_cudagraph_capture_size", None) or 0)
    why = post_grad.install(compilation_config, BucketRangePass(mm))
    if why:
        return why
    compilation_config.compile_ranges_endpoints = endpoints(plans, graph_max,
                                                            compilation_config.compile_ranges_endpoints)
    return None
