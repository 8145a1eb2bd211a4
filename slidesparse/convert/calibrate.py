"""Calibration-aware Z_L pruning: Wanda and SparseGPT, run layer by layer on calibration text.

Both choose which 2 weights of every group of L to drop (the groups are exactly the converter's:
along K, K zero-padded to a multiple of L, the padding counting as zeros; core.prune.prune_mask
picks the 2 smallest keys of each group, ties to the lower index), but with the layer's inputs
X in mind instead of |w| alone:

* Wanda (Sun et al., 2023): key |w_ij| * ||X_j||_2 (X_j: input feature j over all calibration
  tokens); the kept weights keep their values.
* SparseGPT (Frantar & Alistarh, 2023): the OBS saliency w^2 / [H^-1]_jj with H = X^T X (+ a
  damping of `damp` times its mean diagonal), chosen group by group while sweeping the columns
  from left to right; every dropped (or rounded) weight's error is compensated on the columns
  to its right through the Cholesky factor of H^-1 (lazy updates in column blocks, which must
  hold whole groups: a block is a multiple of L).

The sequential pass (the papers' own mode): the calibration text becomes `samples` windows of
`seq_len` tokens, embedded once; then for each decoder layer in order, one forward through the
layer as it is collects the inputs of its projections (H or the squared column norms), its
projections are pruned, and a second forward through the pruned layer gives the next layer's
inputs. So each layer sees inputs that already went through every pruned layer before it.
Memory is the activations of the calibration windows plus one layer (its weights, its H's),
never the model. The layer is transformers' own decoder-layer class (Llama, Qwen2, BitNet)
with the checkpoint's weights, so the calibration forward is the architecture's.

Sources:
* BF16/FP16/FP32 weights: pruned in float32; the converter then quantizes the pruned weight.
* BitNet b1.58: the weights are ternarized first (absmean of the unpruned master weights, as
  the magnitude path does) and the layer runs on codes * s. Wanda's key is zero for existing
  ternary zeros (they go first), |master| * ||X_j|| for the +-1 codes. SparseGPT rounds every
  kept weight back onto the ternary grid {-s, 0, s} as it sweeps (the GPTQ-style joint
  quantization of the SparseGPT paper), so the weights stay ternary and the rounding error is
  compensated as well.
* compressed-tensors W8A8: the layer runs on codes * scale; Wanda keeps the stored codes;
  SparseGPT rounds kept weights onto the source's own per-channel grid (its scales are kept).

Only torch and transformers are needed (no vLLM, no gguf): this runs on the GPU host as it is.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.layout import BLOCKS, FUSED
from ..core.pattern import Pattern, check_groups, parse_pattern
from ..core.prune import prune_mask
from ..core.quant import DTYPES, FP8_MAX, INT8_MAX, quantize_ternary, quantize_weight
from ..core.text import TextError, describe, load_text, load_tokenizer, spread, windows
from .errors import ConvertError

METHODS = ("magnitude", "wanda", "sparsegpt")
# 32 windows of 512 tokens (16k tokens): SparseGPT on SmolLM2-135M in about 3 minutes on 2 CPU
# cores (the papers use 128 x 2048 on a GPU: pass --calib-samples / --calib-len there; H of a
# K-wide input needs well over K tokens to be well conditioned)
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_DAMP = 0.01
# tokens per forward call of a layer: big enough for efficient GEMMs, small enough that the
# MLP's intermediate activations stay small (16k x 18944 float32 = 1.2 GB for Qwen2.5-7B)
CHUNK_TOKENS = 16384

# the projections of a decoder layer that read the same input, in forward order: one set of
# statistics serves a whole group (vLLM fuses q/k/v and gate/up for the same reason)
INPUT_GROUPS = (tuple(f"self_attn.{p}" for p in FUSED["qkv_proj"]), ("self_attn.o_proj",),
                tuple(f"mlp.{p}" for p in FUSED["gate_up_proj"]), ("mlp.down_proj",))
assert {m for g in INPUT_GROUPS for m in g} == {f"{b}.{p}" for b, ps in BLOCKS.items() for p in ps}

_HF_LAYERS = {"llama": ("transformers.models.llama.modeling_llama", "Llama"),
              "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
              "bitnet": ("transformers.models.bitnet.modeling_bitnet", "BitNet")}


def default_block(pat: Pattern) -> int:
    """SparseGPT's column block: the multiple of L nearest 128 (the paper's block), so that every
    block holds whole groups (128 itself would cut the groups of L = 6 and 10)."""
    return pat.group * max(1, round(128 / pat.group))


# ----------------------------------------------------------------------------- the pruners

def wanda_keep(w: torch.Tensor, sq_norm: torch.Tensor, pat: Pattern | str,
               nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """Wanda's Z_L keep-mask [N, K]: drop the 2 smallest |w_ij| * ||X_j|| of every group.

    sq_norm [K]: sum over calibration tokens of x_j^2. nonzero (BitNet: the ternary codes != 0)
    makes the key 0 wherever the stored weight is already 0, so existing zeros go first."""
    key = w.float().abs() * sq_norm.float().sqrt().to(w.device)
    if nonzero is not None:
        key = key * nonzero
    return prune_mask(key, pat)


def row_grid(scale: torch.Tensor, qmax: float | None):
    """Rounding onto a symmetric per-row grid: v -> round(v / s_n) * s_n, clamped to +-qmax
    (int8: 127; ternary: 1); qmax None: FP8-E4M3 (cast after clamping to +-448). 0 stays 0."""
    def grid(v: torch.Tensor) -> torch.Tensor:
        s = scale.to(v.device, v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
        if qmax is None:
            return (v / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(v.dtype) * s
        return (v / s).round().clamp(-qmax, qmax) * s
    return grid


def _damped(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """H (float64) with dead inputs (never non-zero: zero diagonal, e.g. the padding) made
    harmless, and `damp` times its mean diagonal added. Zeroes w's dead columns in place."""
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


class _few_threads:
    """One CPU thread for the column sweep: its steps are vector operations far too small to
    share (two OpenMP threads made them 10-100x slower here, worse on a busy machine)."""

    def __init__(self, device):
        self.cpu = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.cpu:
            self.before = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.cpu:
            torch.set_num_threads(self.before)


class _tf32_matmuls:
    """On CUDA, the float32 matmuls of the calibration forwards (the layer, and the statistics
    X^T X its hooks accumulate) in TF32: on a Hopper GPU float32 without tensor cores runs at
    about 1/8 of that rate, and these matmuls are most of a 7B calibration's arithmetic. The
    activations carry the checkpoint's bf16 precision anyway, and TF32 keeps float32's range and
    accumulation. The pruning itself (SparseGPT's float64 Cholesky, its float32 sweep and block
    updates) runs outside, unchanged. On the CPU nothing changes."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc):
        if self.cuda:
            torch.set_float32_matmul_precision(self.before)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, pat: Pattern | str, block: int | None = None,
                    damp: float = DEFAULT_DAMP, grid=None, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """SparseGPT to Z_L: w [N, K] and h = sum x x^T [K, K] -> the pruned (and, with `grid`,
    rounded) and error-compensated weight [N, K] in `compute` dtype. Every group of L along K
    (K padded with zero columns) ends with at least 2 zeros; the dropped entries are exactly 0."""
    pat = parse_pattern(pat)
    L = pat.group
    block = block or default_block(pat)
    if block % L:
        raise ConvertError(f"SparseGPT's column block ({block}) must be a multiple of L = {L}")
    n, k = w.shape
    kp = pat.padded_k(k)
    dev = w.device
    W = torch.zeros(n, kp, dtype=compute, device=dev)
    W[:, :k] = w.to(compute)
    H = torch.zeros(kp, kp, dtype=torch.float64, device=dev)
    H[:k, :k] = h.to(torch.float64)
    H = _damped(H, W, damp)
    # U: upper Cholesky factor of H^-1. Row i of U, divided by U_ii, is the OBS update of the
    # columns >= i when column i is fixed after the columns < i (the paper's Section 3.2)
    # (H^-1 by cholesky_solve: torch's CPU cholesky_inverse is 20-40x slower at these sizes)
    eye = torch.eye(kp, dtype=torch.float64, device=dev)
    U = torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(H)), upper=True).to(compute)
    del H, eye
    # columns as rows: each step reads and updates contiguous memory
    Wt = W.T.contiguous()
    del W
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        W1, U1 = Wt[b0:b1], U[b0:b1, b0:b1]
        E1 = torch.empty_like(W1)
        d = torch.diagonal(U1)[:, None]
        drop = None
        # each column step is a few launches on one row: on a GPU their count, not their
        # arithmetic, sets the time (about 30k columns per Qwen2.5-7B layer), so the step writes
        # its results in place instead of through temporaries
        with _few_threads(dev):
            for i in range(b1 - b0):
                j = i % L
                if j == 0:  # a new group: choose its 2 zeros with the weights as updated so far
                    drop = ~prune_mask((W1[i: i + L] / d[i: i + L]).square_().T, pat).T
                    if grid is None:  # err = (w - q) / U_ii is w / U_ii where dropped, else 0
                        err_scale = drop.to(W1.dtype).div_(d[i: i + L])
                err = E1[i]
                if grid is None:
                    torch.mul(W1[i], err_scale[j], out=err)
                    W1[i].masked_fill_(drop[j], 0.0)
                else:
                    err.copy_(W1[i])
                    W1[i] = grid(W1[i].masked_fill_(drop[j], 0.0))
                    err.sub_(W1[i]).div_(U1[i, i])
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
        if b1 < kp:
            Wt[b1:].addmm_(U[b0:b1, b1:].T, E1, alpha=-1.0)
    W = Wt.T
    return W[:, :k]


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class CalibSettings:
    """How to calibrate; `record()` is what the checkpoint's config says about it."""

    method: str
    text: str | Path | None = None          # None: pydoc_data.topics
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    device: str = "cpu"
    damp: float = DEFAULT_DAMP
    block: int | None = None                # SparseGPT's column block (default: default_block)


def settings_from_options(prune: str, calib, calib_samples, calib_len, device) -> CalibSettings | None:
    """The converter's --prune / --calib* / --device options -> settings (None: magnitude)."""
    method = (prune or "magnitude").strip().lower()
    if method not in METHODS:
        raise ConvertError(f"unknown --prune {prune!r}: choose {', '.join(METHODS)}")
    if method == "magnitude":
        given = [o for o, v in (("--calib", calib), ("--calib-samples", calib_samples), ("--calib-len", calib_len),
                                ("--device", device)) if v is not None]
        if given:
            raise ConvertError(f"{given[0]} applies to calibrated pruning: use it with --prune wanda or sparsegpt")
        return None
    for opt, v in (("--calib-samples", calib_samples), ("--calib-len", calib_len)):
        if v is not None and v < (2 if opt == "--calib-len" else 1):
            raise ConvertError(f"{opt} must be at least {2 if opt == '--calib-len' else 1}, got {v}")
    dev = device or "cpu"
    try:
        d = torch.device(dev)
    except RuntimeError:
        raise ConvertError(f"--device {dev!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"--device {dev}: no CUDA GPU is available here")
    if d.type not in ("cpu", "cuda"):
        raise ConvertError(f"--device {dev}: only cpu and cuda are supported")
    return CalibSettings(method, calib, calib_samples or DEFAULT_SAMPLES, calib_len or DEFAULT_SEQ_LEN, dev)


# ----------------------------------------------------------------------------- the sequential pass

@dataclass
class _Layer:
    """One decoder layer being calibrated: its transformers module and per-projection state."""

    module: torch.nn.Module
    source: dict = field(default_factory=dict)    # name -> the stored tensor (master / codes)
    codes: dict = field(default_factory=dict)     # BitNet: name -> (unpruned codes, scale [N])
    stats: dict = field(default_factory=dict)     # input-group head -> H [K, K] or sum x^2 [K]


class Calibrator:
    """Prunes a source checkpoint's projections with calibration data, layer by layer.

    quantized(module) gives (w_q, scale) of one projection, exactly what pipeline.quantize_module
    gives for magnitude pruning; modules must be asked for in layer order (the converter's)."""

    def __init__(self, source, pat: Pattern | None, dtype: str, settings: CalibSettings, progress: bool = False):
        if pat is None or pat.zeros == 0:
            raise ConvertError(f"--prune {settings.method} prunes to a 2_L pattern; "
                               f"{pat.name if pat else 'none'} prunes nothing")
        if settings.method not in ("wanda", "sparsegpt"):
            raise ConvertError(f"no calibrated pruner {settings.method!r}")
        self.source, self.pat, self.dtype, self.s = source, pat, dtype, settings
        self.block = settings.block or default_block(pat)
        if self.block % pat.group:
            raise ConvertError(f"SparseGPT's column block ({self.block}) must be a multiple of L = {pat.group}")
        self.device = torch.device(settings.device)
        self.ckpt = source.ckpt
        self.targets = set(source.modules)
        self.progress = progress
        try:
            self.text = load_text(settings.text)
            ids = load_tokenizer(self.ckpt.path)(self.text.content)
            self.windows = spread(windows(ids, settings.seq_len), settings.samples,
                                  f"calibration windows of {settings.seq_len} tokens")
        except TextError as e:
            raise ConvertError(str(e)) from None
        self.tokens_in_text = len(ids)
        self.layers_total = int(self.ckpt.config["num_hidden_layers"])
        self._next = 0
        self._ready: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._hidden = None
        self.seconds = 0.0
        self.phases: dict[str, float] = {}  # seconds: forward + statistics, pruning, forward of the pruned layer
        self._bar = None

    def record(self) -> dict:
        """The `pruning` entry of the checkpoint's quantization_config.source."""
        cal = describe(self.text, samples=self.s.samples, tokens_per_sample=self.s.seq_len,
                       windows="non-overlapping, evenly spaced over the text's token stream",
                       order="sequential: each decoder layer is calibrated on the outputs of the already-pruned layers before it",
                       device=str(self.device))
        if self.s.method == "sparsegpt":
            cal.update(damp=self.s.damp, block=self.block)
        return {"method": self.s.method, "groups": "Z_L along K, K zero-padded (docs/convert.md)",
                "calibration": cal}

    # -- the converter's hook

    def quantized(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        i = int(module.split(".")[2])
        while self._next <= i:
            t0 = time.perf_counter()
            self._layer(self._next)
            self.seconds += time.perf_counter() - t0
            self._next += 1
        if self._next >= self.layers_total:
            self._finish_bar()
        return self._ready.pop(module)

    # -- the pass

    def _hf(self):
        if getattr(self, "_hf_cache", None) is None:
            from transformers import AutoConfig
            arch = self.source.arch
            mod_path, prefix = _HF_LAYERS[arch.model_type]
            mod = importlib.import_module(mod_path)
            cfg = AutoConfig.for_model(arch.model_type, **{k: v for k, v in self.ckpt.config.items()
                                                           if k not in ("quantization_config", "model_type")})
            cfg._attn_implementation = "sdpa"
            rotary = getattr(mod, prefix + "RotaryEmbedding")(cfg).to(self.device)
            self._hf_cache = (cfg, getattr(mod, prefix + "DecoderLayer"), rotary)
        return self._hf_cache

    def _embed(self) -> None:
        from .pipeline import read_finite  # NaN / Inf refused naming the tensor, not met as NaN scores later
        emb = read_finite(self.ckpt, "model.embed_tokens.weight")
        ids = torch.tensor(self.windows, dtype=torch.long)
        self._hidden = emb[ids].to(self.device, torch.float32)  # [samples, seq_len, hidden]
        del emb
        cfg, _, rotary = self._hf()
        pos = torch.arange(self.s.seq_len, device=self.device)[None]
        with torch.no_grad():
            self._rope = rotary(self._hidden[:1], pos)
        self._pos = pos
        from tqdm import tqdm
        self._bar = tqdm(total=self.layers_total, desc=f"calibrate ({self.s.method})", unit="layer",
                         disable=not self.progress, dynamic_ncols=True, leave=False)

    def _finish_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _forward(self, layer: torch.nn.Module, write: bool) -> None:
        """Run every calibration window through `layer` (in chunks); write: keep the outputs."""
        per = max(1, CHUNK_TOKENS // self.s.seq_len)
        cos, sin = self._rope
        with torch.no_grad(), _tf32_matmuls(self.device):
            for s0 in range(0, self._hidden.shape[0], per):
                x = self._hidden[s0: s0 + per]
                pos = self._pos.expand(x.shape[0], -1)
                out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
                out = out[0] if isinstance(out, tuple) else out
                if write:
                    self._hidden[s0: s0 + per] = out

    def _load_layer(self, i: int) -> _Layer:
        from .pipeline import read_finite  # the converter's reader: NaN / Inf refused, naming the tensor
        cfg, layer_cls, _ = self._hf()
        prefix = f"model.layers.{i}."
        names = [n for n in self.ckpt.tensors if n.startswith(prefix)]
        ct = self.source.ct_dtype is not None
        state, lay = {}, _Layer(module=None)
        for n in names:
            local = n[len(prefix):]
            if ct and local.endswith(".weight_scale"):
                continue
            t = read_finite(self.ckpt, n)
            mod = prefix + local.rsplit(".", 1)[0]
            if local.endswith(".weight") and mod in self.targets:
                lay.source[mod] = t
                if ct:
                    t = t.float() * self._ct_scale(mod)[:, None]
                elif self.source.arch.ternary:
                    codes, scale = quantize_ternary(t, self.dtype)
                    lay.codes[mod] = (codes, scale)
                    t = codes.float() * scale[:, None]
            state[local] = t.to(self.device, torch.float32)
        with torch.device("meta"):
            module = layer_cls(cfg, i)
        module = module.to_empty(device=self.device)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConvertError(f"{self.ckpt.path}: layer {i} does not fit {layer_cls.__name__} "
                               f"({str(e).splitlines()[0]})") from None
        lay.module = module.eval()
        return lay

    def _ct_scale(self, mod: str) -> torch.Tensor:
        from .pipeline import read_scale
        return read_scale(self.ckpt, mod + ".weight_scale").float().reshape(-1)

    def _layer(self, i: int) -> None:
        if self._hidden is None:
            self._embed()
        lay = self._load_layer(i)
        prefix = f"model.layers.{i}."
        hooks = []
        sparsegpt = self.s.method == "sparsegpt"
        for group in INPUT_GROUPS:
            if not any(prefix + m in self.targets for m in group):
                continue
            head = prefix + group[0]
            lin = lay.module.get_submodule(group[0])
            k = lin.in_features
            lay.stats[head] = torch.zeros((k, k) if sparsegpt else (k,), dtype=torch.float32, device=self.device)

            def hook(_mod, args, acc=lay.stats[head], k=k):
                x = args[0].reshape(-1, k).float()
                if sparsegpt:
                    acc.addmm_(x.T, x)
                else:
                    acc.add_((x * x).sum(0))
            hooks.append(lin.register_forward_pre_hook(hook))
        t0 = self._clock()
        try:
            self._forward(lay.module, write=False)
        finally:
            for h in hooks:
                h.remove()
        t1 = self._clock()
        for group in INPUT_GROUPS:
            names = [prefix + m for m in group if prefix + m in self.targets]
            if names:
                self._prune_group(lay, names, lay.stats.pop(prefix + group[0]))  # H freed after its group
        t2 = self._clock()
        if i + 1 < self.layers_total:  # the last layer's outputs feed nothing we prune
            self._forward(lay.module, write=True)
        t3 = self._clock()
        for k, v in (("collect", t1 - t0), ("prune", t2 - t1), ("propagate", t3 - t2)):
            self.phases[k] = self.phases.get(k, 0.0) + v
        if self._bar is not None:
            self._bar.update(1)

    def _clock(self) -> float:
        """perf_counter after the device's queued work (phases on a GPU would otherwise be launch times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _grid_scale(self, lay: _Layer, name: str) -> torch.Tensor | None:
        """The per-row scale of the grid SparseGPT rounds onto (BitNet, compressed-tensors), or None."""
        if self.source.arch.ternary:
            return lay.codes[name][1]
        return self._ct_scale(name) if self.source.ct_dtype else None

    def _prune_group(self, lay: _Layer, names: list[str], stat: torch.Tensor) -> None:
        """Prune the projections `names`, which read the same input (statistics `stat`)."""
        lins = [lay.module.get_submodule(n.split(".", 3)[3]) for n in names]
        arch, ct = self.source.arch, self.source.ct_dtype
        if self.s.method == "wanda":
            for name, lin in zip(names, lins):
                stored = lay.source[name]
                w, nonzero = lin.weight.data, None  # float32, on the device: what the layer computes with
                if arch.ternary:
                    nonzero = (lay.codes[name][0].float() != 0).to(self.device)
                    w = stored.to(self.device, torch.float32)  # the key uses the master weights
                keep = wanda_keep(w, stat, self.pat, nonzero=nonzero).cpu()
                result = source_on_mask(stored, keep, self.dtype, arch, self._ct_scale(name) if ct else None)
                if arch.ternary or ct:
                    live = result[0].float() * result[1][:, None]
                else:
                    live = torch.where(keep, stored, torch.zeros((), dtype=stored.dtype)).float()
                lin.weight.data = live.to(self.device, torch.float32)
                self._ready[name] = result
            return
        # SparseGPT treats rows independently given H, so projections that share their input are
        # one sweep over their stacked rows: one Cholesky factor and K column steps, not one per
        # projection
        scales = [self._grid_scale(lay, n) for n in names]
        grid = None
        if scales[0] is not None:
            grid = row_grid(torch.cat(scales), INT8_MAX if ct == "int8" else (None if ct else 1.0))
        rows = [lin.out_features for lin in lins]
        try:
            live = sparsegpt_prune(torch.cat([lin.weight.data for lin in lins]), stat, self.pat, block=self.block,
                                   damp=self.s.damp, grid=grid).cpu()
        except torch.linalg.LinAlgError:  # non-finite activations (an overflowing model) or a degenerate H
            raise ConvertError(f"{names[0]}: SparseGPT's Hessian of this input is not positive definite "
                               "(non-finite calibration activations?); try --prune wanda") from None
        for name, lin, part, scale in zip(names, lins, live.split(rows), scales):
            check_groups(part, self.pat, name=name)
            if scale is None:
                result = quantize_weight(part, self.dtype)
            else:  # grid values: codes * scale, exactly recovered by rounding (int8, ternary) or the cast (fp8)
                codes = part / scale[:, None]
                codes = codes if ct == "fp8_e4m3" else codes.round()
                result = (codes.to(DTYPES[self.dtype]), scale.float().reshape(-1))
            lin.weight.data = part.to(self.device, torch.float32)
            self._ready[name] = result


def source_on_mask(w: torch.Tensor, keep: torch.Tensor, dtype: str, arch, ct_scale: torch.Tensor | None = None):
    """The source weight w (master weights, or compressed-tensors codes with ct_scale) kept
    where `keep`, zero elsewhere, stored as the converter stores it: (w_q, scale). This is
    Wanda's result given its mask, and what `verify --source` checks a Wanda checkpoint against
    (with the stored weight's own non-zeros as the mask: a kept weight that quantizes to 0
    quantizes to 0 either way, and the row maximum, which sets the scale, is never one)."""
    zero = torch.zeros((), dtype=w.dtype)
    if ct_scale is not None:
        return torch.where(keep, w, zero), ct_scale.float().reshape(-1)
    if arch.ternary:
        codes, scale = quantize_ternary(w, dtype)  # absmean of the unpruned master weights
        return torch.where(keep, codes, torch.zeros((), dtype=codes.dtype)), scale
    return quantize_weight(torch.where(keep, w, zero), dtype)
