"""`slidesparse inspect`: what a converted checkpoint holds, layer by layer."""

from __future__ import annotations

import math
import sys

import torch

from ..core.checkpoint import Checkpoint, checkpoint_kind, converted_modules
from ..core.format import SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, TUNING_FILE
from ..core.layout import vllm_layer_shapes
from ..core.quant import dtype_name
from ..core.tuning import TuningTable, count_layers, plan_lines


def inspect_checkpoint(path) -> dict:
    """{"config": quantization_config, "layers": [...], "totals": {...}} for a converted checkpoint.

    Each layer: name, shape [N, K], pattern, dtype, bytes (stored), dense_bytes (the same layer
    dense in the same dtype, without scales), ratio.
    """
    ckpt = Checkpoint(path)
    kind, cfg = checkpoint_kind(ckpt)
    layers, used = [], set()
    for m in converted_modules(ckpt):
        if kind == "slidesparse":
            names = [f"{m}.{s}" for s in (SUFFIX_VALUES, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE)]
            n, k = (int(v) for v in ckpt.get(f"{m}.{SUFFIX_SHAPE}").tolist())
            dtype, pattern = cfg.weight_dtype, cfg.sparsity
        else:
            names = [f"{m}.weight", f"{m}.weight_scale"]
            n, k = ckpt.tensors[f"{m}.weight"].shape
            dtype = dtype_name(str(ckpt.tensors[f"{m}.weight"].dtype).replace("torch.", ""))
            pattern = (ckpt.config.get("slidesparse_export") or {}).get("sparsity", "none")
            pattern = "dense" if pattern == "none" else f"{pattern} (dense)"
        names = [x for x in names if x in ckpt.tensors]
        used.update(names)
        stored = sum(ckpt.tensors[x].nbytes for x in names)
        item = ckpt.tensors[names[0]].dtype
        dense = n * k * torch.empty((), dtype=item).element_size()
        layers.append({"name": m, "shape": [n, k], "pattern": pattern, "dtype": dtype, "bytes": stored,
                       "dense_bytes": dense, "ratio": round(stored / dense, 4)})
    other = sum(i.nbytes for name, i in ckpt.tensors.items() if name not in used)
    conv = sum(x["bytes"] for x in layers)
    dense = sum(x["dense_bytes"] for x in layers)
    return {"path": str(path), "kind": kind, "config": ckpt.config.get("quantization_config"), "layers": layers,
            "totals": {"layers": len(layers), "converted_bytes": conv, "dense_bytes": dense,
                       "ratio": round(conv / dense, 4) if dense else math.nan, "other_bytes": other,
                       "total_bytes": conv + other},
            "tuning": _tuning(ckpt, cfg, layers) if kind == "slidesparse" else None}


def _tuning(ckpt: Checkpoint, cfg, layers: list[dict]) -> dict | None:
    """The checkpoint's tuning table, if it has one with entries (the converter writes an empty
    one): where it was measured and what it serves."""
    f = ckpt.path / TUNING_FILE
    table = TuningTable.load(f) if f.is_file() else None
    if table is None or not table.entries:
        return None
    shapes = vllm_layer_shapes({x["name"]: tuple(x["shape"]) for x in layers}, ckpt.config,
                               table.tensor_parallel_size)
    return {"device": table.device, "library": table.library, "policy": table.policy,
            "tensor_parallel_size": table.tensor_parallel_size,
            "plan": table.plan_summary(count_layers(shapes, cfg.pattern.lifted_k, cfg.weight_dtype))}


def render(report: dict) -> None:
    """Print the report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    qc = report["config"] or {}
    parts = [report["kind"], qc.get("sparsity"), qc.get("weight_dtype", qc.get("format"))]
    title = f"{report['path']}: " + " ".join(p for p in parts if p)
    t = Table(title=title)
    for col in ("layer", "shape [N, K]", "pattern", "dtype", "bytes", "dense bytes", "ratio"):
        t.add_column(col, justify="right" if "bytes" in col or col == "ratio" else "left")
    for x in report["layers"]:
        t.add_row(x["name"].removeprefix("model."), f"{x['shape'][0]} x {x['shape'][1]}", x["pattern"], x["dtype"], f"{x['bytes']:,}",
                  f"{x['dense_bytes']:,}", f"{x['ratio']:.3f}")
    tot = report["totals"]
    t.add_section()
    t.add_row(f"{tot['layers']} layers", "", "", "", f"{tot['converted_bytes']:,}", f"{tot['dense_bytes']:,}",
              f"{tot['ratio']:.3f}")
    c = Console(width=None if sys.stdout.isatty() else 140)
    c.print(t)
    c.print(f"other tensors (embeddings, norms, lm_head, ignored layers): {tot['other_bytes']:,} bytes; "
            f"total {tot['total_bytes']:,} bytes")
    tun = report.get("tuning")
    if report["kind"] == "slidesparse":
        if tun is None:
            c.print("not tuned: every layer runs cuSPARSELt's default algorithm (run `slidesparse tune` on the "
                    "serving GPU)", markup=False)
        else:
            c.print(f"tuned on {tun['device']} (tensor parallel {tun['tensor_parallel_size']}; {tun['library']}):",
                    markup=False)
            for line in plan_lines(tun["plan"]):
                c.print(line, markup=False)
