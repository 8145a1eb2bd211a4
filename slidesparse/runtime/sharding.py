"""Where each checkpoint tensor of a SlideSparse layer goes on this tensor-parallel rank.

A vLLM linear layer may fuse several checkpoint projections along N (qkv_proj = q, k, v;
gate_up_proj = gate, up) and may be split across ranks:
  column-parallel  each projection's rows (N) are split; KV heads are replicated when there are
                   fewer of them than ranks, exactly as vLLM's QKVParallelLinear does;
  row-parallel     K is split; the packed values and 2-bit positions are cut at group boundaries
                   (pattern.shard_packed), so K per rank must be a multiple of L.
Row slices are plain slices of every tensor (values, positions, scales); weight_shape keeps the
full (N, K) of each projection and is checked against the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.format import (SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, FormatError, SlideSparseConfig,
                           layer_shapes)
from ..core.layout import rank_rows
from ..core.pattern import Pattern, shard_packed
from ..core.quant import DTYPES


@dataclass
class Shard:
    name: str        # checkpoint module name, e.g. model.layers.0.self_attn.k_proj
    n_full: int      # rows of the whole projection in the checkpoint
    src_row: int     # first checkpoint row this rank keeps
    rows: int        # rows this rank keeps
    dst_row: int     # where they go in the fused parameter


@dataclass
class LayerShards:
    """The layout of one vLLM linear layer: its shards along N and its K split."""

    layer: torch.nn.Module
    names: list[str]
    k_full: int
    k_local: int
    pattern: Pattern
    loaded: set = field(default_factory=set)   # (suffix, shard index) pairs seen so far

    def rank(self) -> tuple[int, int]:
        return getattr(self.layer, "tp_rank", 0), getattr(self.layer, "tp_size", 1)

    def k_groups(self) -> tuple[int, int] | None:
        """This rank's [g0, g1) groups along K, or None when K is not split."""
        if self.k_local == self.k_full:
            return None
        r, _ = self.rank()
        per = self.k_local // self.pattern.group
        return r * per, (r + 1) * per

    def shards(self) -> list[Shard]:
        from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                       QKVParallelLinear)
        lay = self.layer
        r, t = self.rank()
        if isinstance(lay, (QKVParallelLinear, MergedColumnParallelLinear, ColumnParallelLinear)):
            # checkpoint projections stacked along N, each split by core.layout's rank rule
            head = getattr(lay, "head_size", 1)
            fulls = ([lay.total_num_heads * head, lay.total_num_kv_heads * head, lay.total_num_kv_heads * head]
                     if isinstance(lay, QKVParallelLinear) else
                     list(lay.output_sizes) if isinstance(lay, MergedColumnParallelLinear) else [lay.output_size])
            out, dst = [], 0
            for name, full in zip(self.names, fulls):
                src, rows = rank_rows(name.rpartition(".")[2], full, t, r, head)
                out.append(Shard(name, full, src, rows, dst))
                dst += rows
            return out
        return [Shard(self.names[0], lay.output_size, 0, lay.output_size, 0)]  # row-parallel, replicated

    def index(self, shard_id) -> int:
        if shard_id is None:
            if len(self.names) != 1:
                raise FormatError(f"{', '.join(self.names)} are stored fused; SlideSparse checkpoints store "
                                  "each projection separately")
            return 0
        if isinstance(shard_id, str):
            return "qkv".index(shard_id)
        return int(shard_id)


def _short(shape) -> str:
    return "x".join(map(str, shape))


def make_loader(layer: torch.nn.Module, suffix: str, cfg: SlideSparseConfig):
    """The weight_loader of one SlideSparse parameter of `layer` (accepts both vLLM call styles)."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            shard_id = getattr(loaded, "shard_id", None)
        lay: LayerShards = layer.ss_shards
        i = lay.index(shard_id)
        sh = lay.shards()[i]
        where = f"{sh.name}.{suffix}"
        expected = layer_shapes(sh.n_full, lay.k_full, cfg)[suffix]
        if tuple(loaded.shape) != expected:
            raise FormatError(f"{where}: checkpoint has shape {_short(loaded.shape)}, expected {_short(expected)} "
                              f"for a {sh.n_full}x{lay.k_full} layer at {cfg.sparsity} "
                              f"(does the checkpoint's sparsity/L match its tensors?)")
        if suffix == SUFFIX_SHAPE:
            got = tuple(int(v) for v in loaded.tolist())
            if got != (sh.n_full, lay.k_full):
                raise FormatError(f"{where} says {got}, but the model has a {sh.n_full}x{lay.k_full} layer here")
            param.data[i].copy_(loaded)
        else:
            want = torch.float32 if suffix == SUFFIX_SCALE else (torch.uint8 if suffix == SUFFIX_META
                                                                else DTYPES[cfg.weight_dtype])
            if loaded.dtype != want:
                raise FormatError(f"{where}: dtype {loaded.dtype}, expected {want} for weight_dtype {cfg.weight_dtype}")
            part = loaded[sh.src_row: sh.src_row + sh.rows]
            groups = lay.k_groups()
            if suffix == SUFFIX_VALUES and groups is not None:
                part, _ = shard_packed(part, torch.zeros(part.shape[0], cfg.pattern.meta_bytes(lay.k_full),
                                                         dtype=torch.uint8), cfg.pattern, lay.k_full, groups=groups)
            elif suffix == SUFFIX_META and groups is not None:
                dummy = torch.zeros(part.shape[0], cfg.pattern.kept_k(lay.k_full), dtype=torch.uint8)
                _, part = shard_packed(dummy, part, cfg.pattern, lay.k_full, groups=groups)
            param.data[sh.dst_row: sh.dst_row + sh.rows].copy_(part)
        lay.loaded.add((suffix, i))

    return load
