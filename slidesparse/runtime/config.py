"""vLLM quantization config "slidesparse" and its linear method.

vLLM finds the config by the checkpoint's quantization_config.quant_method (no --quantization
flag), builds one SlideSparseLinearMethod per converted projection, and streams checkpoint tensors
into the parameters created here through our own weight loaders (see sharding.py: merged q/k/v and
gate/up shards, tensor-parallel splits of the packed form). After loading, the packed 2:4 weight is
unpacked once and handed to the chosen backend; apply() is then one custom op.

Works with vLLM 0.26 and 0.32: both call weight_loader(param, tensor[, shard_id]) (0.32 may carry
the shard id as tensor.shard_id instead) and maybe_update_config(model_dir, ...) at config time.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..core.format import (QUANT_METHOD, TUNING_FILE, SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES,
                           FormatError, SlideSparseConfig)
from ..core.layout import TARGET_MODULES, IgnoreRule
from ..core.pattern import unpack
from ..core.quant import DTYPES
from ..core.tuning import TuningTable
from . import bucket_ranges, lift_fusion
from .backends import Backend, SlidWeight, select_backend
from .sharding import LayerShards, make_loader
from .validate import validate_checkpoint

_log = logging.getLogger("vllm.slidesparse")  # under vLLM's logger: its handlers show it

ENV_TUNING = "SLIDESPARSE_TUNING"  # a tuning file that overrides the checkpoint's own


def tuning_path(model_name: str) -> str | None:
    """The tuning file a model is served with: SLIDESPARSE_TUNING, else the checkpoint folder's own
    slidesparse_tuning.json if there is one; None without either."""
    own = os.path.join(model_name, TUNING_FILE)
    return os.environ.get(ENV_TUNING) or (own if os.path.isdir(model_name) and os.path.isfile(own) else None)


class SlideSparseQuantConfig(QuantizationConfig):
    """The checkpoint's `quantization_config` block, as vLLM sees it."""

    def __init__(self, cfg: SlideSparseConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend  # optional "backend" key of the block; SLIDESPARSE_BACKEND wins
        self.ignored = IgnoreRule(cfg.ignore)
        # this checkpoint's tuning table (its slidesparse_tuning.json, or SLIDESPARSE_TUNING), read
        # at config time; the config travels to vLLM's engine and worker processes with it
        self.tuning: TuningTable | None = None
        self._backends: dict[tuple, Backend] = {}  # one instance per device and dtype, for this model
        self._passes_done = False

    def __repr__(self) -> str:
        return f"SlideSparseQuantConfig({self.cfg.sparsity}, {self.cfg.weight_dtype}, act={self.cfg.activation_dtype})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # 2:4 sparse tensor cores; FP8 needs sm_89, checked per layer by backends.check_supported
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the block lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SlideSparseQuantConfig":
        return cls(SlideSparseConfig.from_dict(config), backend=config.get("backend"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None):
        # Runs in the front-end process at config time: a mismatched checkpoint or tuning file
        # fails here with a clear message, before any engine process starts.
        if os.path.isdir(model_name):
            validate_checkpoint(model_name, self.cfg)
        path = tuning_path(model_name)
        self.tuning = TuningTable.load(path) if path else None

    def backend_for(self, device: torch.device) -> Backend:
        key = (str(device), self.cfg.weight_dtype)
        if key not in self._backends:
            self._backends[key] = select_backend(device, self.backend, self.cfg.weight_dtype, tuning=self.tuning)
        return self._backends[key]

    def _proj_names(self, prefix: str) -> list[str]:
        """vLLM layer prefix -> the checkpoint module names it holds (qkv_proj -> q, k, v)."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last, [last])
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head: stored unchanged
        names = self._proj_names(prefix)
        converted = [n.rpartition(".")[2] in TARGET_MODULES and not self.ignored(n) for n in names]
        if not any(converted):
            return UnquantizedLinearMethod()
        if not all(converted):
            raise FormatError(f"{prefix} fuses {', '.join(names)}, but the checkpoint converted only some of them; "
                              "SlideSparse needs all projections of a fused layer converted or all ignored")
        self._install_passes()
        return SlideSparseLinearMethod(self, names)

    def _install_passes(self) -> None:
        """Quantized activations: add the plugin's post-grad passes to the compilation config vLLM
        is building this model with (its backend copies the config after the model is constructed),
        once per model, CUDA only: the bucket-range specialization where the tuning table mixes
        dense and sparse buckets (runtime/bucket_ranges.py), the lift fusion for lifted patterns
        when opted in (runtime/lift_fusion.py; its fused kernels are Triton)."""
        if self._passes_done or self.cfg.activation_dtype is None:
            return
        self._passes_done = True
        from vllm.platforms import current_platform
        if not current_platform.is_cuda():
            return
        from vllm.config import get_current_vllm_config
        cc = get_current_vllm_config().compilation_config
        if self.tuning is not None:
            from .cusparselt_backend import bucket_plan
            dt = self.cfg.weight_dtype
            why = bucket_ranges.install(cc, [bucket_plan(self.tuning, n, kl, dt)[0]
                                             for n, kl, _ in self.tuning.shapes(dt)])
            _log.info("slidesparse: compile-range endpoints %s (%s)", cc.compile_ranges_endpoints,
                      why or "dense buckets outside CUDA graphs run as stock vLLM's layer")
        if self.cfg.pattern.L == 4:
            return
        why = lift_fusion.install(cc)
        if why and lift_fusion.lift_fusion_enabled():
            warnings.warn(f"slidesparse: the lift-fusion pass is not installed ({why}); lifted layers run "
                          f"quantization and the lift as one kernel after their producer")


class SlideSparseLinearMethod(LinearMethodBase):
    """Packed 2:4 values + positions + scales in; one backend op per forward."""

    def __init__(self, qc: SlideSparseQuantConfig, shard_names: list[str]):
        self.qc = qc
        self.cfg = qc.cfg
        self.shard_names = shard_names

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        cfg, pat = self.cfg, self.cfg.pattern
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k != input_size and k % pat.group:
            raise FormatError(f"{self.shard_names[0]}: tensor parallelism splits K={input_size} into {k} per rank, "
                              f"which is not a multiple of L={pat.group} ({cfg.sparsity}); use a tensor-parallel "
                              f"size that divides K into whole groups")
        layer.ss_shards = LayerShards(layer, self.shard_names, input_size, k, pat)
        store = DTYPES[cfg.weight_dtype]
        params = {
            SUFFIX_VALUES: torch.empty(n, pat.kept_k(k), dtype=store),
            SUFFIX_META: torch.empty(n, pat.meta_bytes(k), dtype=torch.uint8),
            SUFFIX_SHAPE: torch.empty(len(self.shard_names), 2, dtype=torch.int64),
        }
        if cfg.quantized:
            params[SUFFIX_SCALE] = torch.empty(n, dtype=torch.float32)
        for suffix, t in params.items():
            p = torch.nn.Parameter(t, requires_grad=False)
            p.weight_loader = make_loader(layer, suffix, cfg)
            layer.register_parameter(suffix, p)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "ss_backend", None) is not None:
            return  # already prepared (vLLM may call this again, e.g. after a reload)
        cfg, shards = self.cfg, layer.ss_shards
        suffixes = [SUFFIX_VALUES, SUFFIX_META, SUFFIX_SHAPE] + ([SUFFIX_SCALE] if cfg.quantized else [])
        missing = [f"{shards.names[i]}.{s}" for s in suffixes for i in range(len(shards.names))
                   if (s, i) not in shards.loaded]
        if missing:
            more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
            raise FormatError(f"checkpoint is missing {', '.join(missing[:4])}{more}; re-convert the model")
        slid = unpack(layer.weight_packed.data, layer.weight_meta.data, cfg.pattern)
        w = SlidWeight(pattern=cfg.pattern, in_features=shards.k_local, out_features=slid.shape[0],
                       weight_dtype=cfg.weight_dtype, act_dtype=cfg.activation_dtype, slid=slid,
                       scale=layer.weight_scale.data if cfg.quantized else None)
        backend = self.qc.backend_for(slid.device)
        backend.prepare(layer, w)
        for s in suffixes:  # the backend keeps what it needs; the packed form is no longer used
            delattr(layer, s)
        layer.ss_backend = backend

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.ss_backend.apply(layer, x, bias)

