"""The plugin's post-grad passes, as the one custom post pass vLLM's compilation config takes.

vLLM's pass manager runs `inductor_compile_config["post_grad_custom_post_pass"]` after its own
fusions, on the functionalized graph of every piece and compile range. The plugin has two passes
(runtime/bucket_ranges.py, runtime/lift_fusion.py) that are installed independently, so the slot
holds a SlideSparsePostGrad that runs the ones installed, in a fixed order.
"""

from __future__ import annotations

import hashlib
import importlib

import torch
from torch import fx

KEY = "post_grad_custom_post_pass"


def vllm_pass_module():
    """vLLM's inductor_pass module (InductorPass, get_pass_context), or None without vLLM."""
    for name in ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass"):
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001  (no vLLM, or one without that module)
            continue
    return None


def pass_base():
    # vLLM's pass manager accepts only its own InductorPass subclasses; plain Inductor takes any
    mod = vllm_pass_module()
    if mod is not None and hasattr(mod, "InductorPass"):
        return mod.InductorPass
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return CustomGraphPass


def val(node):
    """A node's example value (a FakeTensor, a SymInt), None for anything else."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def arg_nodes(args) -> list:
    out = []
    fx.node.map_arg(args, out.append)
    return out


def fake_mode(args):
    """The fake mode of the nodes in args (to compute new nodes' example values), or None."""
    from torch._guards import detect_fake_mode
    return detect_fake_mode([v for v in map(val, arg_nodes(args)) if isinstance(v, torch.Tensor)])


class SlideSparsePostGrad(pass_base()):
    """Runs its passes in ORDER: the bucket-range specialization first (it rewrites
    sparse_linear_codes nodes only, which the lift fusion never touches; the order just keeps one
    answer)."""

    ORDER = ("BucketRangePass", "LiftFusionPass")

    def __init__(self) -> None:
        self.passes: list = []

    def add(self, p) -> None:
        if any(type(q) is type(p) for q in self.passes):
            return
        self.passes.append(p)
        self.passes.sort(key=lambda q: self.ORDER.index(type(q).__name__))

    def get(self, cls):
        return next((p for p in self.passes if isinstance(p, cls)), None)

    def uuid(self) -> str:
        # Inductor's cache key for the pass: the passes' own keys, in order
        return hashlib.sha256("|".join(p.uuid() for p in self.passes).encode()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)


def install(compilation_config, p) -> str | None:
    """Add pass p to the compilation config's custom post pass (before the model's backend copies
    the config). Returns why it is not installed, or None."""
    cfg = compilation_config.inductor_compile_config
    cur = cfg.get(KEY)
    if cur is None:
        cur = cfg[KEY] = SlideSparsePostGrad()
    if not isinstance(cur, SlideSparsePostGrad):
        return f"another {KEY} is configured ({type(cur).__name__})"
    cur.add(p)
    return None
