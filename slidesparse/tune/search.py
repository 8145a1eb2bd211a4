"""`slidesparse tune`: per layer shape and M bucket, the sparse path or the dense one, measured.

For each distinct (N, K) of the linear layers vLLM builds from a checkpoint (fused q/k/v and
gate/up, per tensor-parallel rank) and each M bucket, on random data of the layer's pattern and
dtype (a GEMM's speed does not depend on the values): cuSPARSELt's own search picks the algorithm
id; then the runtime's own layer (bench/harness.py), compiled as vLLM compiles it and between the
producer and consumer it has in a model, is timed with an all-dense plan (vLLM's CUTLASS GEMM,
the baseline users run), an all-sparse plan, and sparse buckets inside a mixed plan, interleaved;
choose_plan() decides, preferring plans that keep one copy of the weight (MIXED_MIN_GAIN). The
runtime keeps the unslid weight only for layers with a dense bucket.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..core.checkpoint import Checkpoint, checkpoint_kind
from ..core.errors import SlideSparseError
from ..core.format import SUFFIX_SHAPE, TUNING_FILE, SlideSparseConfig
from ..core.layout import vllm_layer_shapes
from ..core.quant import DTYPES
from ..core.tuning import TuningEntry, TuningTable

# 512: vLLM's default largest CUDA graph. 128: a bucket measured at 256 serves M = 65-256, and on
# the H200 Qwen2.5-7B 2_4 FP8 decoded 128 sequences at 0.863x of dense with 256's choices while 64
# and 256 (each measured at its own M) ran 1.13x and 1.08x (results/H200/e2e_matrix, 2026-12-03)
M_BUCKETS = (16, 64, 128, 256, 512, 1024, 4096, 16384)

# What a plan is chosen for. A step of at most DECODE_MAX_M tokens is a decode step (one token per
# running sequence, vLLM's default max_num_seqs is 256); larger ones are prefill chunks. "balanced"
# weighs every bucket alike; "prefill" and "decode" count only their own buckets (the others still
# run whatever the chosen plan gives them).
OBJECTIVES = ("balanced", "prefill", "decode")
DECODE_MAX_M = 256


def bucket_weights(buckets, objective: str = "balanced") -> list[float]:
    if objective not in OBJECTIVES:
        raise TuneError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "balanced":
        return [1.0] * len(buckets)
    mine = [(m <= DECODE_MAX_M) == (objective == "decode") for m in buckets]
    if not any(mine):
        side = "<=" if objective == "decode" else ">"
        raise TuneError(f"objective {objective} needs an M bucket {side} {DECODE_MAX_M}; the buckets are "
                        f"{','.join(map(str, buckets))}")
    return [1.0 if x else 0.0 for x in mine]


class TuneError(SlideSparseError):
    pass


def checkpoint_shapes(ckpt: Path, tp: int = 1) -> tuple[SlideSparseConfig, list[tuple[int, int, str]]]:
    """(config, sorted distinct (N, K, producer) of the layers vLLM builds on one of `tp` ranks).

    The producer (bench/harness.PRODUCERS) is the kernel that makes the layer's input, which the
    tuner times the layer behind. The table is keyed by shape: where layers of one shape have
    different producers (not in the presets), the RMSNorm one is measured."""
    from ..bench.harness import producer_of
    try:
        c = Checkpoint(ckpt)  # validates config.json and every safetensors header
        kind, cfg = checkpoint_kind(c)
        projections = {name[:-len("." + SUFFIX_SHAPE)]: tuple(int(v) for v in c.get(name).tolist())
                       for name in c.tensors if name.endswith("." + SUFFIX_SHAPE)}
        by_shape: dict[tuple[int, int], set[str]] = {}
        for name, shape in (vllm_layer_shapes(projections, c.config, tp) if projections else {}).items():
            by_shape.setdefault(shape, set()).add(producer_of(name, c.config))
        shapes = sorted((n, k, "rms_norm" if len(p) > 1 else p.pop()) for (n, k), p in by_shape.items())
    except SlideSparseError as e:
        raise TuneError(str(e)) from None
    if kind != "slidesparse":
        raise TuneError(f"{ckpt} is a dense {kind} checkpoint: nothing to tune")
    if not projections:
        raise TuneError(f"{ckpt}: no converted layers ({SUFFIX_SHAPE} tensors) found")
    return cfg, shapes


# A plan that mixes kinds keeps two copies of the layer's weight on the GPU (the dense one and a
# compressed one, or cuSPARSELt's and CUTLASS's compressed forms): on the H200 a 2_8 Qwen2.5-7B whose
# gate/up layers were CUTLASS only at M <= 64 (8% faster there, 2% on the mean) held 11.8 GiB of
# weights instead of 8.2 GiB, memory the KV cache loses. So a mix must beat the best one-copy plan
# by this much of the dense time (mean over the buckets) to be chosen.
MIXED_MIN_GAIN = 0.05

# A one-copy plan other than dense may not lose more than this fraction of the dense time at any
# bucket that counts (weight > 0): a mean gain bought with a loss at some M is a step slower than
# the dense model there, which users see. On the H200 (2026-12-03) the 2_6 and 2_8 INT8 Qwen2.5-7B
# tables put gate/up on cuSPARSELt at every bucket (7-13% faster at M=64 and 2048, 3-14% slower at
# 256 and 512), and those engines decoded 128-512 sequences at 0.76-0.93x and prefilled at
# 0.95-0.96x of dense (results/H200/e2e_matrix/tuner_vs_e2e.md). A mix takes the faster form at
# every bucket, so it never loses.
MAX_BUCKET_LOSS = 0.02


def choose_plan(t_dense: list[float], t_sparse: list[float], in_op: dict[str, list[float]] | None,
                mixed_min_gain: float = MIXED_MIN_GAIN, weights: list[float] | None = None,
                max_bucket_loss: float = MAX_BUCKET_LOSS) -> list[str]:
    """The backend of every M bucket from the measured forms of a layer (traced by torch.compile,
    as vLLM runs it):

        t_dense           every bucket dense: vLLM's CUTLASS GEMM, scales in its epilogue
        t_sparse          every bucket cuSPARSELt: the lifted GEMM, its dequant fused into the consumer
        in_op["sparse"]   a cuSPARSELt bucket of a plan that also has dense or CUTLASS buckets: the
                          traced graph cannot branch on M, so such a layer's op returns finished
                          outputs and its cuSPARSELt buckets pay a dequant pass of their own
        in_op["cutlass"]  a bucket on SlideSparse's CUTLASS kernel (scales in its epilogue)

    A plan's cost is its mean time relative to dense over the buckets (weighted by `weights`,
    bucket_weights(); default: every bucket alike). The one-copy plans
    (all-dense, all-cuSPARSELt, all-CUTLASS) compete first, ties to the simpler, each but dense only
    if it is no slower than (1 + max_bucket_loss) x dense at every weighted bucket; the mix that takes
    the fastest finishing form per bucket replaces the winner only if it saves at least
    `mixed_min_gain` more (it holds two weight copies: MIXED_MIN_GAIN). in_op None (an unquantized
    layer, which runs one eager op whatever its buckets): the per-bucket forms are t_dense and t_sparse."""
    nb = len(t_dense)
    if not 0 <= mixed_min_gain < 1:
        raise ValueError(f"mixed_min_gain must be in [0, 1), got {mixed_min_gain}")
    if not max_bucket_loss >= 0:  # also false for nan
        raise ValueError(f"max_bucket_loss must be >= 0, got {max_bucket_loss}")
    finishing = {"dense": t_dense, **(in_op if in_op is not None else {"sparse": t_sparse})}
    singles = [["dense"] * nb, ["sparse"] * nb] + [[k] * nb for k in finishing if k not in ("dense", "sparse")]
    mixed = [min(finishing, key=lambda k: finishing[k][i]) for i in range(nb)]

    wts = [1.0] * nb if weights is None else list(weights)
    if len(wts) != nb or min(wts) < 0 or sum(wts) <= 0:
        raise ValueError(f"weights must be {nb} non-negative numbers, not all zero, got {weights}")

    def times(plan):
        return t_sparse if set(plan) == {"sparse"} else [finishing[b][i] for i, b in enumerate(plan)]

    def cost(plan):
        return sum(w * t / d for w, t, d in zip(wts, times(plan), t_dense)) / sum(wts)

    def never_slower(plan):
        return all(w == 0 or t <= d * (1 + max_bucket_loss) for w, t, d in zip(wts, times(plan), t_dense))
    eligible = [p for p in singles if p[0] == "dense" or never_slower(p)]
    best = min(eligible, key=cost)  # min keeps the first of equals
    if len(set(mixed)) > 1 and cost(mixed) <= cost(best) - mixed_min_gain:
        return mixed
    return best


def best_cutlass_configs(w, buckets, gen) -> list[str] | None:
    """Per bucket, the fastest compiled configuration of SlideSparse's CUTLASS kernel (each base
    configuration and the untuned default, timed alone on lifted codes), or None where the kernel
    cannot run here."""
    from ..bench.harness import graph_time_ms
    from ..kernels import cutlass_sparse as cs
    from ..kernels.quant_slide import quant_slide
    dt = DTYPES[w.weight_dtype]
    if w.act_dtype is None or not cs.available() or w.out_features % cs.N_ALIGN:
        return None
    cw = cs.compress(w.slid)
    names = [c for c in cs.configs(dt) if ":" not in c]
    best = []
    for m in buckets:
        xq, s = quant_slide(torch.randn(m, w.in_features, device="cuda", generator=gen).bfloat16(), w.pattern,
                            w.act_dtype, k_align=cs.K_ALIGN)
        cands = list(dict.fromkeys(names + [cs.default_config(dt, m)]))
        t = {}
        for c in cands:
            try:
                t[c] = graph_time_ms(lambda c=c: cs.scaled_sparse_mm(xq, cw, s, w.scale, None, torch.bfloat16, c),
                                     target_ms=2.0, replays=3)
            except RuntimeError:  # a configuration that cannot run this problem (e.g. its split)
                continue
        best.append(min(t, key=t.get))
    return best


def tune_shape(n: int, k: int, cfg: SlideSparseConfig, buckets=M_BUCKETS, rounds: int = 2,
               dense_cache: dict | None = None, mixed_min_gain: float = MIXED_MIN_GAIN,
               objective: str = "balanced", producer: str = "rms_norm",
               graph_max_m: int | None = None, max_bucket_loss: float = MAX_BUCKET_LOSS) -> list[TuningEntry]:
    """Measure one layer shape at every bucket's M in the forms the runtime runs, behind its
    producer (bench/harness.PRODUCERS), and decide.

    dense_cache: times of the all-dense form keyed by (n, k, dtype, producer, M), shared between
    the checkpoints of one `slidesparse tune` call (every variant of a model has the same dense
    layers)."""
    from ..bench.harness import (DENSE_EVERYWHERE, GRAPH_MAX_M, eager_forward, input_width, prepare, random_weight,
                                 step_time_ms, traced_forward)
    graph_max_m = GRAPH_MAX_M if graph_max_m is None else graph_max_m
    from ..core.tuning import MAX_M
    from ..kernels import cusparselt as cl
    from ..kernels.quant_slide import quant_slide

    pat, wdt, act = cfg.pattern, cfg.weight_dtype, cfg.activation_dtype
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    w = random_weight(n, k, pat.name, wdt, gen)
    wc = cl.compress(w.slid)
    acc_dt = cl.acc_dtype_for(DTYPES[wdt]) if act else None
    width = input_width(k, producer)
    xs = {m: torch.randn(m, width, device="cuda", generator=gen).to(torch.bfloat16) for m in buckets}
    res = {m: torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16) for m in buckets}
    algs = []
    for m in buckets:
        xq, _ = quant_slide(xs[m][:, :k].contiguous(), pat, act, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN,
                            out_dtype=None if act else DTYPES[wdt])
        algs.append(cl.search_alg(wc, xq, acc_dt))  # cuSPARSELt times its own algorithms here
    del wc
    sparse_plan = [(m, "sparse", a) for m, a in zip(buckets, algs)]
    plans = {"dense": DENSE_EVERYWHERE, "sparse": sparse_plan}
    if act:
        plans["sparse_in_op"] = sparse_plan + [(MAX_M, "dense", 0)]
        cut = best_cutlass_configs(w, buckets, gen)
        if cut is not None:
            plans["cutlass"] = [(m, "cutlass", 0, c) for m, c in zip(buckets, cut)]
    make = traced_forward if act else eager_forward
    fns = {}
    for name, plan in plans.items():
        if name == "dense" and dense_cache is not None and all((n, k, wdt, producer, m) in dense_cache
                                                               for m in buckets):
            continue
        fns[name] = make(*prepare(w, plan), producer=producer)
    times: dict[str, dict[int, list[float]]] = {name: {m: [] for m in buckets} for name in fns}
    for r in range(rounds):
        for m in buckets:
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]  # interleaved, rotating
            for name in order:
                times[name][m].append(step_time_ms(lambda f=fns[name], m=m: f(xs[m], res[m]), m, graph_max_m))
    med = {name: [statistics.median(times[name][m]) for m in buckets] for name in times}
    if "dense" not in med:
        med["dense"] = [dense_cache[(n, k, wdt, producer, m)] for m in buckets]
    elif dense_cache is not None:
        dense_cache.update({(n, k, wdt, producer, m): t for m, t in zip(buckets, med["dense"])})
    in_op = {k: med[v] for k, v in (("sparse", "sparse_in_op"), ("cutlass", "cutlass")) if v in med} if act else None
    chosen = choose_plan(med["dense"], med["sparse"], in_op, mixed_min_gain, bucket_weights(buckets, objective),
                         max_bucket_loss)
    all_sparse = set(chosen) == {"sparse"}

    def form_time(backend: str, i: int) -> float:
        if backend == "sparse":   # fused dequant only in an all-cuSPARSELt plan
            return med["sparse" if all_sparse or not act else "sparse_in_op"][i]
        return med[backend][i]
    entries = []
    for i, (m, alg, backend) in enumerate(zip(buckets, algs, chosen)):
        t_s = min(form_time(b, i) for b in ("sparse", "cutlass") if b in med)
        entries.append(TuningEntry(n=n, k_lifted=pat.lifted_k(k), dtype=wdt, m_max=m, backend=backend,
                                   alg_id=alg if backend == "sparse" else 0,
                                   config=plans["cutlass"][i][3] if backend == "cutlass" else None,
                                   us=round(1000 * form_time(backend, i), 2), us_sparse=round(1000 * t_s, 2),
                                   us_dense=round(1000 * med["dense"][i], 2)))
    return entries


def tune_checkpoints(ckpts: list[Path], buckets=M_BUCKETS, progress=None, tp: int = 1,
                     mixed_min_gain: float = MIXED_MIN_GAIN, objective: str = "balanced",
                     graph_max_m: int | None = None, max_bucket_loss: float = MAX_BUCKET_LOSS) -> list[Path]:
    """Tune each checkpoint on this GPU and write its slidesparse_tuning.json (atomically)."""
    bucket_weights(buckets, objective)  # a bad objective fails before any measurement
    if not 0 <= mixed_min_gain < 1:
        raise TuneError(f"mixed_min_gain must be in [0, 1), got {mixed_min_gain}")
    if not max_bucket_loss >= 0:
        raise TuneError(f"max_bucket_loss must be >= 0, got {max_bucket_loss}")
    if not torch.cuda.is_available():
        raise TuneError("tuning needs the CUDA GPU the checkpoints will run on")
    work = [(ckpt, *checkpoint_shapes(ckpt, tp)) for ckpt in ckpts]  # every checkpoint checked first
    total = sum(len(shapes) for _, _, shapes in work)
    dense_cache: dict = {}
    done, out = 0, []
    for ckpt, cfg, shapes in work:
        entries = []
        for n, k, producer in shapes:
            entries += tune_shape(n, k, cfg, buckets, dense_cache=dense_cache, mixed_min_gain=mixed_min_gain,
                                  objective=objective, producer=producer, graph_max_m=graph_max_m,
                                  max_bucket_loss=max_bucket_loss)
            done += 1
            if progress:
                progress(done, total, f"{ckpt.name}: N={n} K={k} ({producer})")
        table = TuningTable(device=torch.cuda.get_device_name(), tensor_parallel_size=tp, entries=tuple(entries),
                            library=_libraries(cfg),
                            policy=policy_text(buckets, objective, mixed_min_gain, graph_max_m, max_bucket_loss))
        table.save(ckpt / TUNING_FILE)
        out.append(ckpt / TUNING_FILE)
    return out


def policy_text(buckets, objective: str, mixed_min_gain: float, graph_max_m: int | None = None,
                max_bucket_loss: float = MAX_BUCKET_LOSS) -> str:
    """How the table's plans were chosen, as the tuning file records it."""
    from ..bench.harness import GRAPH_MAX_M
    from ..runtime.lift_fusion import form_text
    w = bucket_weights(buckets, objective)
    g = GRAPH_MAX_M if graph_max_m is None else graph_max_m
    return (f"objective {objective} (bucket weights {', '.join(f'M<={m}: {x:g}' for m, x in zip(buckets, w))}); "
            f"a one-copy sparse plan may lose at most {max_bucket_loss:g} of dense time at any weighted bucket; "
            f"a plan with two weight copies must save {mixed_min_gain:g} of dense time more than the best one-copy plan; "
            f"timed from CUDA-graph replays at M <= {g} and from back-to-back launches above (host time included); "
            f"{form_text()}")


def _libraries(cfg: SlideSparseConfig) -> str:
    """What the table was measured with: the libraries and the dense kernel it was compared with."""
    from ..kernels import cutlass_sparse as cs
    from ..kernels.dense import dense_kernel
    dense = dense_kernel(cfg.activation_dtype) if cfg.activation_dtype else "torch linear"
    cut = cs.build_info() if cs.available() else f"not available ({cs.why_unavailable()})"
    return (f"cuSPARSELt {torch.backends.cusparselt.version()} (torch {torch.__version__}); "
            f"SlideSparse CUTLASS: {cut}; dense: {dense}")
