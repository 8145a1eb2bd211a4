"""The lift-fusion pass: fold `slidesparse::quant_lift` into the kernel that produces its input.

A traced lifted layer (2_6, 2_8, 2_10, 2_inf with no dense bucket) starts with
`slidesparse::quant_lift(x)`: per-token quantization and the lift, one opaque op. Left alone it
reads x (bf16) and writes x'. Where x comes from an op we can compute ourselves, this post-grad
pass replaces producer + quant_lift by one kernel of kernels/fused_lift.py that writes x' (and
everything else the producer returned) directly:

    vllm_ir.fused_add_rms_norm(x, r, w, eps)[0] -> quant_lift   =>  add_rms_norm_quant_lift   (qkv, gate_up)
    vllm_ir.rms_norm(x, w, eps) -> quant_lift                   =>  rms_norm_quant_lift       (layer 0's qkv)
    SiLU(t[:, :d]) * t[:, d:] -> quant_lift                     =>  silu_mul_quant_lift       (down)

Where x (or t) is itself the dequant of a lifted layer's cuSPARSELt accumulator (down -> the next
add+RMSNorm, gate_up -> SiLU*mul), which Inductor would otherwise have fused into the producer,
the dequant goes into the same kernel (the dequant_* variants): folding the producer into an
opaque op must not leave a dequant pass behind (measured on the H200, 2026-12-02: it did, 17 ms
of a 16384-token Qwen2.5-7B step).

The producer's output must have no other user (it would still have to be written). The attention
output feeding o_proj is an opaque op: its quant_lift stays, still one kernel instead of two.

vLLM 0.26 keeps RMSNorm as vLLM IR ops in the post-grad graph until its IR lowering, which runs
after the custom passes; SiLU*mul arrives decomposed (or as vLLM's `_C.silu_and_mul` where that
custom op is enabled). With SLIDESPARSE_LIFT_FUSION=1 the plugin installs the pass per model
(`install`), from the quantization config, as `post_grad_custom_post_pass` of vLLM's compilation
config (vLLM's pass manager runs it with its own passes), and lifted layers with no dense bucket
trace quant_lift. Without it (the default) they trace the codes-then-lift form: quantization in
torch ops fused by Inductor into the producer, the lift inside the GEMM op. The fused form is
opt-in because on the H200 it measured slower end to end (docs/performance.md): the producer
kernels here are slower than Inductor's, which the lift they save does not make up for.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import sys
from pathlib import Path

import torch
from torch import fx

from . import post_grad
from .post_grad import KEY, pass_base  # noqa: F401  (KEY: the slot, for callers)
from .post_grad import arg_nodes as _nodes, fake_mode as _fake_mode, val as _val

ENV = "SLIDESPARSE_LIFT_FUSION"

_log = logging.getLogger("vllm.slidesparse.lift_fusion")  # under vLLM's logger: its handlers show it

aten, prims = torch.ops.aten, torch.ops.prims


def lift_fusion_enabled() -> bool:
    # opt-in: on the H200 the fused form measured slower end to end than the codes-then-lift
    # form it replaces (docs/performance.md, 2026-12-02 fourth session), so it is not the default
    return os.environ.get(ENV, "0") == "1"


def form_text() -> str:
    """How lifted layers trace, as a tuning table's policy records it (the runtime compares)."""
    return f"lift fusion {'on' if lift_fusion_enabled() else 'off'}"


def form_mismatch(policy: str | None) -> str | None:
    """Why a table measured under another traced form may choose wrongly now, or None."""
    if not policy:
        return None
    for other in ("on", "off"):
        if f"lift fusion {other}" in policy and form_text() != f"lift fusion {other}":
            return (f"the tuning table was measured with lift fusion {other}, this run has {form_text()} "
                    f"({ENV}); re-run `slidesparse tune` with the setting you serve with")
    return None


def _packet(node) -> object:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "_overloadpacket", None)


def _ir(name: str):
    ns = getattr(torch.ops, "vllm_ir", None)
    try:
        return getattr(ns, name) if ns is not None else None
    except (AttributeError, RuntimeError):
        return None


def _getitem_of(node, index: int):
    """The producer p when node is p[index]."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == index:
        return node.args[0]
    return None


def _is_2d(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 2


def _last_dim_slice(node, start_is_zero: bool):
    """(t, bound) if node = t[:, :bound] (start_is_zero) or t[:, bound:]."""
    if _packet(node) is not aten.slice:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    t, dim, start, end, step = args[:5]
    if not _is_2d(t) or dim not in (1, -1) or step not in (None, 1):
        return None
    if start_is_zero:
        return (t, end) if start in (None, 0) else None
    return (t, start) if end is None or (isinstance(end, int) and end >= sys.maxsize) else None


def _strip_convert(node):
    while _packet(node) is prims.convert_element_type:
        node = node.args[0]
    return node


def _silu_of(node):
    """u when node computes silu(u), in any of the forms Inductor's decompositions leave."""
    inner = _strip_convert(node)
    p = _packet(inner)
    if p is aten.silu:
        return _strip_convert(inner.args[0])
    if p is aten.div:  # u / (1 + exp(-u))
        u, den = inner.args
        if _packet(den) is aten.add:
            e = next((a for a in den.args if _packet(a) is aten.exp), None)
            one = next((a for a in den.args if not isinstance(a, fx.Node)), None)
            if e is not None and one == 1 and _packet(e.args[0]) is aten.neg and e.args[0].args[0] is u:
                return _strip_convert(u)
    if p is aten.mul:  # u * sigmoid(u)
        a, b = inner.args
        for u, s in ((a, b), (b, a)):
            if _packet(s) is aten.sigmoid and s.args[0] is u:
                return _strip_convert(u)
    return None


def _match_dequant(x):
    """(acc, s_tok, s_ch, bias, n, out_dtype) when x is the traced layer's dequant of a
    slidesparse::sparse_mm_lifted accumulator (cusparselt_backend.apply_lifted: acc[:m, :n] *
    s_tok[:, None] * s_ch (+ bias), in float32, then x's dtype), every step used only by the next."""
    if _packet(x) is not prims.convert_element_type:
        return None
    out_dtype, e, bias = x.args[1], x.args[0], None
    chain = [e]
    if _packet(e) is aten.add:
        for main, b in (e.args, e.args[::-1]):
            bn = _strip_convert(b)
            bv = _val(bn)
            if isinstance(main, fx.Node) and _packet(main) is aten.mul and isinstance(bv, torch.Tensor) and bv.dim() == 1:
                bias, e = bn, main
                chain += [b, e]
                break
        else:
            return None
    if _packet(e) is not aten.mul:
        return None
    for e3, sc in (e.args, e.args[::-1]):
        v = _val(sc)
        if isinstance(e3, fx.Node) and _packet(e3) is aten.mul and isinstance(v, torch.Tensor) and v.dim() == 1 \
                and v.dtype == torch.float32:
            break
    else:
        return None
    chain.append(e3)
    for c, u in (e3.args, e3.args[::-1]):
        if _packet(u) is aten.unsqueeze and _packet(c) is prims.convert_element_type:
            break
    else:
        return None
    chain += [c, u]
    s_tok, node = u.args[0], c.args[0]
    while _packet(node) is aten.slice and node.args[2] in (None, 0):
        chain.append(node)
        node = node.args[0]
    smm = getattr(torch.ops.slidesparse, "sparse_mm_lifted", None)
    xv = _val(x)
    if smm is None or _packet(node) is not smm or xv is None or not isinstance(xv.shape[1], int):
        return None
    if any(len(n.users) != 1 for n in chain if isinstance(n, fx.Node) and n.op == "call_function"):
        return None  # (x's own readers are the caller's to check)
    return node, s_tok, sc, bias, xv.shape[1], out_dtype


def _match_silu_mul(x):
    """(t, nodes) when x = silu(t[:, :d]) * t[:, d:]."""
    g = _getitem_of(x, 1)
    silu_and_mul = getattr(getattr(torch.ops, "_C", None), "silu_and_mul", None) if hasattr(torch.ops, "_C") else None
    if g is not None and g.op == "call_function" and g.target is torch.ops.higher_order.auto_functionalized \
            and silu_and_mul is not None and _packet(g.args[0]) is silu_and_mul:
        t = g.kwargs.get("input")
        return (t, {g}) if _is_2d(t) else None
    if _packet(x) is not aten.mul or len(x.args) != 2:
        return None
    for a, b in (x.args, x.args[::-1]):
        up = _last_dim_slice(b, start_is_zero=False)
        u = _silu_of(a) if isinstance(a, fx.Node) else None
        gate = _last_dim_slice(u, start_is_zero=True) if u is not None else None
        if up and gate and up[0] is gate[0] and (up[1] is gate[1] or up[1] == gate[1]):
            t = gate[0]
            tv, xv = _val(t), _val(x)
            if xv is not None and tv is not None and tv.shape[1] == 2 * xv.shape[1]:
                return t, {b, u}  # the slices are t's readers
    return None


class LiftFusionPass(pass_base()):
    """Post-grad pass (see the module docstring). Counts what it did on `last`."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def uuid(self) -> str:
        # Inductor's cache key for the pass: its source
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        ql = getattr(torch.ops.slidesparse, "quant_lift", None)
        if ql is None:
            return
        count = {"add_rms_norm": 0, "rms_norm": 0, "silu_mul": 0, "left": 0}
        self._dequant = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is ql.default:
                count[self._fuse(graph, node)] += 1
        count["with_dequant"] = self._dequant
        self.last = count
        if sum(count.values()):
            _log.info("slidesparse lift fusion: %s", ", ".join(f"{k} {v}" for k, v in count.items()))

    def _fuse(self, graph: fx.Graph, q: fx.Node) -> str:
        x, sparsity, act, k_align, m_align = q.args
        if len(x.users) != 1 or not _is_2d(x) or any(u.target is not operator.getitem for u in q.users):
            return "left"
        ops = torch.ops.slidesparse
        fused_add, rms = _ir("fused_add_rms_norm"), _ir("rms_norm")
        p = _getitem_of(x, 0)
        if p is not None and fused_add is not None and _packet(p) is fused_add:
            xin, res, w, eps, *rest = p.args
            if rest and rest[0] is not None or p.kwargs:
                return "left"  # variance_size: not in our kernel
            deq = _match_dequant(xin) if len(xin.users) == 1 else None
            if deq is not None:  # the previous layer's dequant pass goes into the same kernel
                return self._replace(graph, q, p, ops.dequant_add_rms_norm_quant_lift.default,
                                     (*deq, res, w, eps, sparsity, act, k_align, m_align), residual_of=p,
                                     kind="add_rms_norm", dequant=True)
            return self._replace(graph, q, p, ops.add_rms_norm_quant_lift.default,
                                 (xin, res, w, eps, sparsity, act, k_align, m_align), residual_of=p, kind="add_rms_norm")
        if rms is not None and _packet(x) is rms:
            xin, w, eps, *rest = x.args
            if rest and rest[0] is not None or x.kwargs:
                return "left"
            return self._replace(graph, q, x, ops.rms_norm_quant_lift.default,
                                 (xin, w, eps, sparsity, act, k_align, m_align), kind="rms_norm")
        m = _match_silu_mul(x)
        if m is not None:
            t, readers = m
            deq = _match_dequant(t) if set(t.users) <= readers else None
            if deq is not None:
                return self._replace(graph, q, x, ops.dequant_silu_mul_quant_lift.default,
                                     (*deq, sparsity, act, k_align, m_align), kind="silu_mul", dequant=True)
            return self._replace(graph, q, x, ops.silu_mul_quant_lift.default, (t, sparsity, act, k_align, m_align),
                                 kind="silu_mul")
        return "left"

    def _replace(self, graph: fx.Graph, q: fx.Node, anchor: fx.Node, op, args: tuple, kind: str,
                 residual_of: fx.Node | None = None, dequant: bool = False) -> str:
        """Insert op(*args) after anchor (its inputs are defined there and every user of q and of
        the producer's residual comes later), re-point q's outputs (and the residual) at it, and
        drop the nodes left without users."""
        fake = _fake_mode(args)
        with graph.inserting_after(anchor):
            new = graph.call_function(op, args)
        vals = None
        if fake is not None:
            with fake:
                vals = op(*fx.map_arg(args, _val))
            new.meta["val"] = vals
        outs = []
        prev = new
        for i in range(3 if residual_of is not None else 2):
            with graph.inserting_after(prev):
                g = graph.call_function(operator.getitem, (new, i))
            if vals is not None:
                g.meta["val"] = vals[i]
            outs.append(g)
            prev = g
        for u in list(q.users):  # q returns a tuple: its users are getitems
            u.replace_all_uses_with(outs[u.args[1]])
            graph.erase_node(u)
        old_input = q.args[0]
        graph.erase_node(q)
        if residual_of is not None:
            for u in list(residual_of.users):
                if u.target is operator.getitem and u.args[1] == 1:
                    u.replace_all_uses_with(outs[2])
                    graph.erase_node(u)
        _erase_dead(graph, old_input)
        self._dequant += dequant
        return kind


def _erase_dead(graph: fx.Graph, start: fx.Node) -> None:
    """Erase start and its inputs, transitively, while they have no users and are pure."""
    todo, erased = [start], set()
    while todo:
        n = todo.pop()
        if n in erased or n.op != "call_function" or n.users or n.is_impure():
            continue
        ins = _nodes((n.args, n.kwargs))
        graph.erase_node(n)
        erased.add(n)
        todo.extend(ins)


def install(compilation_config) -> str | None:
    """Put the pass into vLLM's compilation config (runtime/post_grad.py). Returns why it is not
    installed, or None."""
    if not lift_fusion_enabled():
        return f"{ENV} is not 1 (the fused form is opt-in)"
    return post_grad.install(compilation_config, LiftFusionPass())
