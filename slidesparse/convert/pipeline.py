"""`convert()`: a Hugging Face checkpoint -> a SlideSparse-Z_L (or dense W8A8 compressed-tensors) one.

Per converted projection: prune (Z_L magnitude, prune.py) -> quantize (quant.py) -> slide -> pack,
one tensor at a time, written straight to its shard. Everything else is copied byte for byte.
The source directory is only read; the output appears atomically (writer.AtomicDir).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..core.checkpoint import Checkpoint, first_nonfinite, open_regular
from ..core.errors import shown
from ..core.format import (SUFFIX_META, SUFFIX_SCALE, SUFFIX_SHAPE, SUFFIX_VALUES, TUNING_FILE,
                           SlideSparseConfig)
from ..core.layout import (FUSED, Arch, IgnoreRule, check_config, check_fused_ignored, is_projection, layer_key,
                           model_tensors, projection_shapes)
from ..core.pattern import Pattern, PatternError, parse_pattern
from ..core.prune import prune_codes, prune_magnitude
from ..core.quant import DTYPES, QUANTIZED, QuantError, dtype_name, quantize_ternary, quantize_weight
from ..core.tuning import TuningTable
from . import compressed_tensors as ct
from .errors import ConvertError
from .fastpack import slide_pack
from .writer import AtomicDir, Planned, ShardedWriter, check_apart

FORMATS = ("slidesparse", "compressed-tensors")
# quantization_config.source.pruning of a magnitude-pruned checkpoint (calibrated: calibrate.py's record)
MAGNITUDE = "magnitude per group, ties to the lower column index (docs/convert.md)"
# files besides the weights that make a checkpoint usable (tokenizer, generation defaults, chat template)
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
             "chat_template.json", "preprocessor_config.json")
# what a source's tensors may be stored as (the compressed-tensors codes aside)
SOURCE_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- the source

@dataclass
class Source:
    """A validated source checkpoint and what the converter will do with it."""

    ckpt: Checkpoint
    arch: Arch
    ct_dtype: str | None              # storage dtype of a compressed-tensors W8A8 source, else None
    modules: list[str]                # projections to convert
    ignored: list[str]                # projections left as they are (--ignore)
    shapes: dict[str, tuple[int, int]]


def open_source(src: str | Path, ignore=()) -> Source:
    ckpt = Checkpoint(src)
    ckpt.check_index()
    cfg = ckpt.config
    arch = check_config(cfg, ckpt.tensors)
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConvertError(f"{src}: quantization_config is {type(qc).__name__}, not a JSON object")
    ct_dtype = None
    if qc:
        method = qc.get("quant_method")
        if method == ct.QUANT_METHOD:
            _check_ct_structure(src, qc)
            ct_dtype = ct.source_dtype(qc)
        elif method == "slidesparse":
            raise ConvertError(f"{src}: already a SlideSparse checkpoint")
        elif method == "bitnet":
            raise ConvertError(f"{src}: packed BitNet checkpoints are not supported; convert the BF16 master "
                               "weights (e.g. microsoft/bitnet-b1.58-2B-4T-bf16)")
        else:
            raise ConvertError(f"{src}: source quantization {shown(method)} is not supported "
                               "(BF16/FP16/FP32 or compressed-tensors W8A8)")
    expected = projection_shapes(cfg)
    present = {n[: -len(".weight")] for n in ckpt.tensors if n.endswith(".weight")}
    present = {m for m in present if is_projection(m)}
    extra = sorted(present - set(expected), key=layer_key)
    if extra:
        raise ConvertError(f"{src}: tensor {shown(extra[0] + '.weight', 120)} does not fit config.json "
                           f"(num_hidden_layers={cfg.get('num_hidden_layers')})")
    missing = sorted(set(expected) - present, key=layer_key)
    if missing:
        raise ConvertError(f"{src}: missing tensor {missing[0]}.weight ({len(missing)} projections missing)")
    is_ignored = IgnoreRule(tuple(ignore))
    modules, ignored = [], []
    for m in sorted(expected, key=layer_key):
        info = ckpt.tensors[m + ".weight"]
        if not ct_dtype and info.dtype not in SOURCE_FLOATS:
            raise ConvertError(f"{src}: {m}.weight is {str(info.dtype).removeprefix('torch.')}; projections must be "
                               "BF16, FP16 or FP32 (or the codes of a compressed-tensors W8A8 checkpoint)")
        if info.shape != expected[m]:
            raise ConvertError(f"{src}: {m}.weight has shape {list(info.shape)}, but config.json implies "
                               f"{list(expected[m])} (hidden, intermediate, heads, kv heads, head_dim)")
        bias = ckpt.tensors.get(m + ".bias")
        if bias is not None and bias.shape != (expected[m][0],):
            raise ConvertError(f"{src}: {m}.bias has shape {list(bias.shape)}, expected [{expected[m][0]}]")
        if arch.qkv_bias and m.rsplit(".", 1)[1] in FUSED["qkv_proj"] and bias is None:
            raise ConvertError(f"{src}: {m}.bias is missing ({arch.name} has q/k/v biases)")
        (ignored if is_ignored(m) else modules).append(m)
        if ct_dtype:
            _check_ct_module(ckpt, m, info, ct_dtype, expected[m][0], ignored=is_ignored(m))
    check_fused_ignored(ignored)
    _check_complete(ckpt, src, arch, set(expected), ct_dtype)
    return Source(ckpt, arch, ct_dtype, modules, ignored, expected)


def _check_complete(ckpt: Checkpoint, src, arch: Arch, projections: set[str], ct_dtype: str | None) -> None:
    """Every tensor the architecture has is there, in a float dtype and its shape, and nothing
    else (a compressed-tensors source adds one weight_scale per projection): a checkpoint without
    its final norm, or with tensors of another model, would convert into one vLLM serves wrongly."""
    want = dict(model_tensors(ckpt.config))
    have = ckpt.tensors
    for name, shape in want.items():
        info = have.get(name)
        if info is None:
            raise ConvertError(f"{src}: tensor {name} is missing (a {arch.name} with this config.json has it)")
        if name[: -len(".weight")] in projections:
            continue  # checked by open_source
        if info.shape != shape:
            raise ConvertError(f"{src}: {name} has shape {list(info.shape)}, but config.json implies {list(shape)}")
        if info.dtype not in SOURCE_FLOATS:
            raise ConvertError(f"{src}: {name} is {str(info.dtype).removeprefix('torch.')}, not BF16, FP16 or FP32")
    scales = {m + ".weight_scale" for m in projections} if ct_dtype else set()
    extra = sorted((n for n in have if n not in want and n not in scales), key=layer_key)
    if extra:
        raise ConvertError(f"{src}: unexpected tensor {shown(extra[0])} (not part of a {arch.name} with this "
                           f"config.json{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")


def _check_ct_structure(src, qc: dict) -> None:
    """The shape of a compressed-tensors block that compressed_tensors.source_dtype reads."""
    groups = qc.get("config_groups")
    if groups is not None and not isinstance(groups, dict):
        raise ConvertError(f"{src}: quantization_config.config_groups is not a JSON object")
    for name, g in (groups or {}).items():
        if g is not None and not isinstance(g, dict):
            raise ConvertError(f"{src}: compressed-tensors config group {shown(name)} is not a JSON object")
        for part in ("weights", "input_activations"):
            v = (g or {}).get(part)
            if v is not None and not isinstance(v, dict):
                raise ConvertError(f"{src}: compressed-tensors config group {shown(name)}: {part} is not a JSON object")
            if isinstance(v, dict) and not isinstance(v.get("type", ""), str):
                raise ConvertError(f"{src}: compressed-tensors config group {shown(name)}: {part}.type is not a string")
    if not isinstance(qc.get("format", ""), (str, type(None))):
        raise ConvertError(f"{src}: quantization_config.format is not a string")


def read_scale(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A compressed-tensors weight_scale, refused unless finite and positive."""
    s = read_finite(ckpt, name)
    if not bool((s > 0).all()):
        raise ConvertError(f"{ckpt.path}: {name} holds {s.float().min().item()}; scales must be positive")
    return s


def _check_quantized(name: str, q: torch.Tensor, scale: torch.Tensor | None, dtype: str) -> None:
    """Finite inputs can still overflow: FP32 weights above 65504 in FP16, or an absmean scale
    summed past the float32 range."""
    bad = first_nonfinite(q)
    if bad is not None:
        raise ConvertError(f"{name}: the weight at {list(bad)} overflows {dtype}")
    if scale is not None and (first_nonfinite(scale) is not None or not bool((scale > 0).all())):
        raise ConvertError(f"{name}: the quantization scale is not a positive finite number "
                           f"(weights too large for float32 arithmetic)")


def read_finite(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One source tensor, refused if it holds NaN or Inf: an Inf would quantize to an infinite
    scale and NaN codes, a NaN would break pruning's magnitude order."""
    t = ckpt.get(name)
    bad = first_nonfinite(t)
    if bad is not None:
        raise ConvertError(f"{ckpt.path}: {name} holds {t[bad].float().item()} at {list(bad)}; weights must be "
                           "finite")
    return t


def _check_ct_module(ckpt, m, info, ct_dtype, n, ignored):
    if ignored:
        raise ConvertError(f"--ignore {m}: ignoring quantized projections of a compressed-tensors source "
                           "is not supported")
    if info.dtype != DTYPES[ct_dtype]:
        raise ConvertError(f"{ckpt.path}: {m}.weight is {info.dtype}, but quantization_config says {ct_dtype}")
    s = ckpt.tensors.get(m + ".weight_scale")
    if s is None:
        raise ConvertError(f"{ckpt.path}: {m}.weight_scale is missing (compressed-tensors source)")
    if s.shape not in ((n, 1), (n,)) or not s.dtype.is_floating_point:
        raise ConvertError(f"{ckpt.path}: {m}.weight_scale has shape {list(s.shape)} {s.dtype}; "
                           f"expected per-channel [{n}, 1] floats")


# ----------------------------------------------------------------------------- one module

def quantize_module(w: torch.Tensor, pat: Pattern | None, dtype: str, arch: Arch,
                    ct_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source weight [N, K] -> (pruned, quantized w_q [N, K] in the storage dtype, scale [N] or None).

    The single definition of "the pruned and quantized source" that `verify --source` checks
    against. ct_scale given: w holds compressed-tensors codes (kept, only pruned).
    """
    if ct_scale is not None:
        q = prune_codes(w, pat) if pat is not None else w
        return q, ct_scale.float().reshape(-1)
    if arch.ternary:
        codes, scale = quantize_ternary(w, dtype)  # absmean from the unpruned master weights
        return (prune_codes(codes, pat, master=w) if pat is not None else codes), scale
    if pat is not None:
        w = prune_magnitude(w, pat)  # in the source precision: the same order as in float32
    return quantize_weight(w, dtype)


def slid_tensors(prefix: str, q: torch.Tensor, scale, pat: Pattern) -> dict[str, torch.Tensor]:
    """The stored tensors of one SlideSparse layer (format.py names)."""
    n, k = q.shape
    values, meta = slide_pack(q, pat)
    out = {f"{prefix}.{SUFFIX_VALUES}": values, f"{prefix}.{SUFFIX_META}": meta}
    if scale is not None:
        out[f"{prefix}.{SUFFIX_SCALE}"] = scale.float().contiguous()
    out[f"{prefix}.{SUFFIX_SHAPE}"] = torch.tensor([n, k], dtype=torch.int64)
    return out


def _planned_module(prefix: str, n: int, k: int, dtype: str, pat: Pattern | None, fmt: str) -> list[Planned]:
    sd = DTYPES[dtype]
    quantized = dtype in QUANTIZED
    if fmt == "compressed-tensors":
        return [Planned(f"{prefix}.weight", sd, (n, k)), Planned(f"{prefix}.weight_scale", torch.float32, (n, 1))]
    p = [Planned(f"{prefix}.{SUFFIX_VALUES}", sd, (n, pat.kept_k(k))),
         Planned(f"{prefix}.{SUFFIX_META}", torch.uint8, (n, pat.meta_bytes(k)))]
    if quantized:
        p.append(Planned(f"{prefix}.{SUFFIX_SCALE}", torch.float32, (n,)))
    p.append(Planned(f"{prefix}.{SUFFIX_SHAPE}", torch.int64, (2,)))
    return p


# ----------------------------------------------------------------------------- convert

def resolve_options(src: Source, sparsity: str, dtype: str | None, fmt: str) -> tuple[Pattern | None, str]:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown --format {fmt!r}: choose {' or '.join(FORMATS)}")
    if str(sparsity).strip().lower() == "none":
        if fmt != "compressed-tensors":
            raise ConvertError("--sparsity none writes a dense checkpoint: use it with --format compressed-tensors")
        pat = None
    else:
        try:
            pat = parse_pattern(sparsity)
        except PatternError as e:
            raise ConvertError(str(e)) from None
    if dtype is None:
        dtype = src.ct_dtype or "fp8_e4m3"
    try:
        dtype = dtype_name(dtype)
    except QuantError as e:
        raise ConvertError(str(e)) from None
    if src.ct_dtype and dtype != src.ct_dtype:
        raise ConvertError(f"the source is a {src.ct_dtype} compressed-tensors checkpoint whose values are kept: "
                           f"use --dtype {src.ct_dtype.split('_')[0]}")
    if src.arch.ternary and dtype not in QUANTIZED:
        raise ConvertError(f"BitNet b1.58 weights are ternary: use --dtype int8 or fp8, not {dtype}")
    if fmt == "compressed-tensors" and dtype not in QUANTIZED:
        raise ConvertError(f"--format compressed-tensors writes W8A8: use --dtype int8 or fp8, not {dtype}")
    return pat, dtype


def convert(src: str | Path, dst: str | Path, sparsity: str = "2_8", dtype: str | None = None,
            fmt: str = "slidesparse", ignore=(), overwrite: bool = False,
            max_shard_bytes: int = 2 * 1024**3, progress: bool = False, threads: int | None = None,
            prune: str = "magnitude", calib: str | Path | None = None, calib_samples: int | None = None,
            calib_len: int | None = None, device: str | None = None) -> dict:
    """Convert the HF checkpoint `src` into `dst`; returns a summary dict.

    sparsity: "2_L" / "(L-2):L" / "2_inf", or "none" (dense; only with fmt="compressed-tensors").
    dtype: fp8 (default) | int8 | bf16 | fp16; default for compressed-tensors sources: their own.
    fmt: "slidesparse" (default) or "compressed-tensors" (dense W8A8 that stock vLLM loads).
    ignore: module-name patterns to leave unconverted (globs; 're:' prefix for a regex, re.search).
    prune: "magnitude" (default), or "wanda" / "sparsegpt", calibrated on the UTF-8 text file
    `calib` (default: pydoc_data.topics), `calib_samples` windows of `calib_len` tokens, with
    torch on `device` (default cpu); see calibrate.py.
    Raises ConvertError (one-line message) on bad input; never writes into `src`.
    """
    from .calibrate import settings_from_options
    cal = settings_from_options(prune, calib, calib_samples, calib_len, device)
    cpus = os.cpu_count() or 1
    # more threads than CPUs only costs; far more crashed torch's thread pool at exit (100000)
    if threads is not None and (type(threads) is not int or not 1 <= threads <= cpus):
        raise ConvertError(f"--threads must be between 1 and {cpus} (this machine's CPUs), got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or cpus)
    try:
        return _convert(src, dst, sparsity, dtype, fmt, ignore, overwrite, max_shard_bytes, progress, cal)
    finally:
        torch.set_num_threads(before)  # a library call must not leave the caller's setting changed


def _convert(src, dst, sparsity, dtype, fmt, ignore, overwrite, max_shard_bytes, progress, cal=None) -> dict:
    t0 = time.perf_counter()
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    check_apart(src_path, dst_path, dst)
    if cal is not None and cal.text is not None:  # the calibration text is an input too
        check_apart(Path(cal.text).resolve(), dst_path, dst, what="the calibration text")
    source = open_source(src_path, ignore)
    pat, dtype = resolve_options(source, sparsity, dtype, fmt)
    ckpt = source.ckpt
    calibrator = None
    if cal is not None:  # reads and tokenizes the calibration text now, before anything is written
        from .calibrate import Calibrator
        calibrator = Calibrator(source, pat, dtype, cal, progress=progress)
    pruning = calibrator.record() if calibrator else MAGNITUDE
    aux = {f: ckpt.file(f) for f in AUX_FILES}  # refused now if one escapes the folder or is not a file

    convert_set = set(source.modules)
    consumed = {m + ".weight_scale" for m in convert_set} if source.ct_dtype else set()
    plan: list[Planned] = []
    jobs: list[tuple[str, str]] = []  # (kind, name)
    for name in sorted(ckpt.tensors, key=layer_key):
        if name in consumed:
            continue
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod in convert_set:
            n, k = source.shapes[mod]
            plan += _planned_module(mod, n, k, dtype, pat, fmt)
            jobs.append(("module", mod))
        else:
            info = ckpt.tensors[name]
            plan.append(Planned(name, info.dtype, info.shape))
            jobs.append(("copy", name))

    with AtomicDir(dst_path, overwrite=overwrite) as tmp:  # claims the destination before any work
        writer = ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
        try:
            _run_jobs(ckpt, source, jobs, writer, pat, dtype, fmt, progress, calibrator)
            files = writer.close()
        finally:
            writer.abort()
        config = dict(ckpt.config)
        if fmt == "slidesparse":
            qcfg = _slidesparse_config(source, pat, dtype, ignore, src_path, pruning)
            config["quantization_config"] = qcfg.to_dict()
            TuningTable().save(tmp / TUNING_FILE)
        else:
            config["quantization_config"] = ct.export_config(dtype, list(ignore))
            # how it was made, outside quantization_config (which vLLM parses); verify reads it
            config["slidesparse_export"] = {"sparsity": pat.name if pat else "none", "ignore": list(ignore),
                                            "converter": f"slidesparse {__version__}"}
            if pat is not None:
                config["slidesparse_export"]["pruning"] = pruning
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f, real in aux.items():
            if real is not None:
                with open_regular(real, src_path / f) as fi, open(tmp / f, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
    return {
        "source": str(src), "destination": str(dst), "architecture": source.arch.name,
        "format": fmt, "sparsity": pat.name if pat else "none", "dtype": dtype,
        "converted": len(source.modules), "ignored": len(source.ignored),
        "copied": sum(1 for k, _ in jobs if k == "copy"), "files": files,
        "bytes_in": sum(i.nbytes for i in ckpt.tensors.values()), "bytes_out": writer.total,
        "seconds": round(time.perf_counter() - t0, 3),
        "pruning": calibrator.s.method if calibrator else ("magnitude" if pat is not None and pat.zeros else "none"),
        **({"calibration_seconds": round(calibrator.seconds, 3),
            "calibration_phases": {k: round(v, 3) for k, v in calibrator.phases.items()}} if calibrator else {}),
    }


def _slidesparse_config(source: Source, pat: Pattern, dtype: str, ignore, src_path: Path,
                        pruning=None) -> SlideSparseConfig:
    quantized = dtype in QUANTIZED
    if source.arch.ternary:
        scheme = "ternary_absmean"
    else:
        scheme = "per_channel_symmetric" if quantized else "none"
    return SlideSparseConfig(
        sparsity=pat.name, weight_dtype=dtype, weight_scheme=scheme,
        activation_dtype=dtype if quantized else None,
        activation_scheme="per_token_dynamic" if quantized else "none",
        ignore=tuple(ignore),
        source={"name": src_path.name, "architecture": source.arch.name,
                "weights": f"compressed-tensors {source.ct_dtype}" if source.ct_dtype else
                str(source.ckpt.config.get("torch_dtype") or source.ckpt.config.get("dtype") or "unknown"),
                "pruning": pruning or MAGNITUDE, "converter": f"slidesparse {__version__}"})


def _run_jobs(ckpt, source, jobs, writer, pat, dtype, fmt, progress, calibrator=None) -> None:
    from tqdm import tqdm

    total = sum(ckpt.tensors[n + ".weight" if k == "module" else n].nbytes for k, n in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress,
              dynamic_ncols=True) as bar:
        for kind, name in jobs:
            if kind == "copy":
                t = read_finite(ckpt, name)
                writer.write(name, t)
                bar.update(ckpt.tensors[name].nbytes)
                continue
            bar.set_postfix_str(name.removeprefix("model."), refresh=False)
            if calibrator is None:
                w = read_finite(ckpt, name + ".weight")
                scale_src = read_scale(ckpt, name + ".weight_scale") if source.ct_dtype else None
            try:
                if calibrator is not None:  # reads, calibrates and prunes this module's layer itself
                    q, scale = calibrator.quantized(name)
                else:
                    q, scale = quantize_module(w, pat, dtype, source.arch, scale_src)
                    del w
                _check_quantized(name, q, scale, dtype)
                if fmt == "compressed-tensors":
                    out = {f"{name}.weight": q, f"{name}.weight_scale": scale.float().reshape(-1, 1)}
                else:
                    out = slid_tensors(name, q, scale, pat)
            except PatternError as e:
                raise ConvertError(f"{name}: {e}") from None
            for n, t in out.items():
                writer.write(n, t)
            bar.update(ckpt.tensors[name + ".weight"].nbytes)
