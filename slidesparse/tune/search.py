"""`slidesparse tune`: per layer shape and M bucket, the sparse path or the dense one, measured.

For each distinct (N, K) of the linear layers vLLM builds from a checkpoint (fused q/k/v and
gate/up, per tensor-parallel rank) and each M bucket, on random data of the layer's pattern and
dtype (a GEMM's speed does not depend on the values): cuSPARSELt's own search picks the algorithm
id; then the runtime's own layer (bench/harness.py), compiled as vLLM compiles it and between the
producer and consumer it has in a model, is timed with an all-dense plan (vLLM's CUTLASS GEMM,
the baseline users run), an all-sparse plan, and sparse buckets inside a mixed plan, interleaved;
choose_plan() decides. The runtime keeps the unslid weight only for layers with a dense bucket.
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

M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)


class TuneError(SlideSparseError):
    pass


def checkpoint_shapes(ckpt: Path, tp: int = 1) -> tuple[SlideSparseConfig, list[tuple[int, int]]]:
    """(config, sorted distinct (N, K) of the layers vLLM builds on one of `tp` ranks)."""
    try:
        c = Checkpoint(ckpt)  # validates config.json and every safetensors header
        kind, cfg = checkpoint_kind(c)
        projections = {name[:-len("." + SUFFIX_SHAPE)]: tuple(int(v) for v in c.get(name).tolist())
                       for name in c.tensors if name.endswith("." + SUFFIX_SHAPE)}
        shapes = sorted(set(vllm_layer_shapes(projections, c.config, tp).values())) if projections else []
    except SlideSparseError as e:
        raise TuneError(str(e)) from None
    if kind != "slidesparse":
        raise TuneError(f"{ckpt} is a dense {kind} checkpoint: nothing to tune")
    if not projections:
        raise TuneError(f"{ckpt}: no converted layers ({SUFFIX_SHAPE} tensors) found")
    return cfg, shapes


def choose_plan(t_dense: list[float], t_sparse: list[float], t_sparse_in_op: list[float] | None) -> list[str]:
    """The backend of every M bucket from the three measured forms of a layer (traced by
    torch.compile, as vLLM runs it):

        t_dense         every bucket dense: vLLM's CUTLASS GEMM, scales in its epilogue
        t_sparse        every bucket sparse: the lifted GEMM, its dequant fused into the consumer
        t_sparse_in_op  a sparse bucket of a plan that also has dense buckets: the traced graph
                        cannot branch on M, so such a layer's op returns finished outputs and its
                        sparse buckets pay a dequant pass of their own

    The candidates are all-dense, all-sparse, and the mix that takes the faster of t_dense and
    t_sparse_in_op per bucket; the one with the smallest mean time relative to dense over the
    buckets wins (ties: the simpler plan). None for t_sparse_in_op (an unquantized layer, which
    runs one eager op whatever its buckets) means each bucket takes the faster of the two."""
    nb = len(t_dense)
    if t_sparse_in_op is None:
        return ["sparse" if s <= d else "dense" for d, s in zip(t_dense, t_sparse)]
    mixed = ["sparse" if a < d else "dense" for d, a in zip(t_dense, t_sparse_in_op)]
    cands = [["dense"] * nb, ["sparse"] * nb]
    if "sparse" in mixed and "dense" in mixed:
        cands.append(mixed)

    def cost(plan):
        if "dense" not in plan:
            times = t_sparse
        else:
            times = [d if b == "dense" else a for b, d, a in zip(plan, t_dense, t_sparse_in_op)]
        return sum(t / d for t, d in zip(times, t_dense)) / nb
    return min(cands, key=cost)  # min keeps the first of equals: dense, then all-sparse


def tune_shape(n: int, k: int, cfg: SlideSparseConfig, buckets=M_BUCKETS, rounds: int = 2,
               dense_cache: dict | None = None) -> list[TuningEntry]:
    """Measure one layer shape at every bucket's M in the forms the runtime runs, and decide.

    dense_cache: times of the all-dense form keyed by (n, k, dtype, M), shared between the
    checkpoints of one `slidesparse tune` call (every variant of a model has the same dense
    layers)."""
    from ..bench.harness import DENSE_EVERYWHERE, eager_forward, graph_time_ms, prepare, random_weight, traced_forward
    from ..core.tuning import MAX_M
    from ..kernels import cusparselt as cl
    from ..kernels.quant_slide import quant_slide

    pat, wdt, act = cfg.pattern, cfg.weight_dtype, cfg.activation_dtype
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    w = random_weight(n, k, pat.name, wdt, gen)
    wc = cl.compress(w.slid)
    acc_dt = cl.acc_dtype_for(DTYPES[wdt]) if act else None
    xs = {m: torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for m in buckets}
    res = {m: torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16) for m in buckets}
    algs = []
    for m in buckets:
        xq, _ = quant_slide(xs[m], pat, act, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN,
                            out_dtype=None if act else DTYPES[wdt])
        algs.append(cl.search_alg(wc, xq, acc_dt))  # cuSPARSELt times its own algorithms here
    del wc
    sparse_plan = [(m, "sparse", a) for m, a in zip(buckets, algs)]
    plans = {"dense": DENSE_EVERYWHERE, "sparse": sparse_plan}
    if act:
        plans["sparse_in_op"] = sparse_plan + [(MAX_M, "dense", 0)]
    make = traced_forward if act else eager_forward
    fns = {}
    for name, plan in plans.items():
        if name == "dense" and dense_cache is not None and all((n, k, wdt, m) in dense_cache for m in buckets):
            continue
        fns[name] = make(*prepare(w, plan))
    times: dict[str, dict[int, list[float]]] = {name: {m: [] for m in buckets} for name in fns}
    for r in range(rounds):
        for m in buckets:
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]  # interleaved, rotating
            for name in order:
                times[name][m].append(graph_time_ms(lambda f=fns[name], m=m: f(xs[m], res[m])))
    med = {name: [statistics.median(times[name][m]) for m in buckets] for name in times}
    if "dense" not in med:
        med["dense"] = [dense_cache[(n, k, wdt, m)] for m in buckets]
    elif dense_cache is not None:
        dense_cache.update({(n, k, wdt, m): t for m, t in zip(buckets, med["dense"])})
    chosen = choose_plan(med["dense"], med["sparse"], med.get("sparse_in_op"))
    sparse_form = med["sparse"] if "dense" not in chosen or not act else med["sparse_in_op"]
    entries = []
    for i, (m, alg, backend) in enumerate(zip(buckets, algs, chosen)):
        t_s, t_d = sparse_form[i], med["dense"][i]
        entries.append(TuningEntry(n=n, k_lifted=pat.lifted_k(k), dtype=wdt, m_max=m, backend=backend, alg_id=alg,
                                   us=round(1000 * (t_s if backend == "sparse" else t_d), 2),
                                   us_sparse=round(1000 * t_s, 2), us_dense=round(1000 * t_d, 2)))
    return entries


def tune_checkpoints(ckpts: list[Path], buckets=M_BUCKETS, progress=None, tp: int = 1) -> list[Path]:
    """Tune each checkpoint on this GPU and write its slidesparse_tuning.json (atomically)."""
    if not torch.cuda.is_available():
        raise TuneError("tuning needs the CUDA GPU the checkpoints will run on")
    work = [(ckpt, *checkpoint_shapes(ckpt, tp)) for ckpt in ckpts]  # every checkpoint checked first
    total = sum(len(shapes) for _, _, shapes in work)
    dense_cache: dict = {}
    done, out = 0, []
    for ckpt, cfg, shapes in work:
        entries = []
        for n, k in shapes:
            entries += tune_shape(n, k, cfg, buckets, dense_cache=dense_cache)
            done += 1
            if progress:
                progress(done, total, f"{ckpt.name}: N={n} K={k}")
        table = TuningTable(device=torch.cuda.get_device_name(), tensor_parallel_size=tp, entries=tuple(entries),
                            library=f"cuSPARSELt {torch.backends.cusparselt.version()} (torch {torch.__version__}); "
                                    f"dense: {_dense_kernel_name(cfg)}")
        table.save(ckpt / TUNING_FILE)
        out.append(ckpt / TUNING_FILE)
    return out


def _dense_kernel_name(cfg: SlideSparseConfig) -> str:
    from ..kernels.dense import dense_kernel
    return dense_kernel(cfg.activation_dtype) if cfg.activation_dtype else "torch linear"
