"""`slidesparse bench ...` commands (kernel and end-to-end benchmarks)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Kernel and end-to-end benchmarks; results go under results/<device>/.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Kernel and end-to-end benchmarks; results go under results/<device>/."""


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _ints(s: str, what: str) -> list[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        _fail(f"--{what} takes comma-separated integers, got {s!r}")
    if not v or any(x < 1 for x in v):
        _fail(f"--{what} needs positive integers, got {s!r}")
    return v


def device_tag() -> str:
    import torch
    name = torch.cuda.get_device_name()
    for tag in ("H100", "H200", "A100", "L40S", "B200"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


@app.command("kernel")
def kernel(
    presets: str = typer.Option("qwen2.5-7b,llama3.2-1b", help="comma-separated model presets (make-model's)"),
    m: str = typer.Option("16,64,256,1024,4096,16384,65536", "--m", help="token counts M"),
    dtypes: str = typer.Option("fp8_e4m3,int8", help="fp8_e4m3 and/or int8"),
    sparsities: str = typer.Option("2_4,2_6,2_8,2_10,2_inf", help="SlideSparse patterns"),
    rounds: int = typer.Option(3, min=1, help="interleaved timing rounds (median kept)"),
    search_min_m: int = typer.Option(1, help="run cuSPARSELt's algorithm search for M >= this (else alg 0)"),
    forms: str = typer.Option("eager,traced", help="layer forms to time besides the GEMM: eager, traced "
                                                   "(compiled as vLLM runs it), in_op (sparse buckets of a mixed plan)"),
    out: Path = typer.Option(None, help="output folder (default results/<device>/)"),
    report_only: Path = typer.Option(None, help="re-render the report from an existing kernel_bench.json"),
):
    """Dense vs SlideSparse GEMM and whole linear on each preset's qkv/o/gate_up/down shapes."""
    from . import report
    from .shapes import PresetError, linear_shapes, presets as all_presets

    if report_only is not None:
        if not report_only.is_file():
            _fail(f"no such file: {report_only}")
        rows, env = report.load_rows(report_only)
        for p in report.write_all(rows, env, out or report_only.parent):
            typer.echo(p)
        return
    import torch
    from ..core.pattern import PatternError, parse_pattern
    from ..core.quant import QuantError, dtype_name

    if not torch.cuda.is_available():
        _fail("the kernel benchmark needs a CUDA GPU (see docs/gpu-host.md)")
    plist = [p.strip() for p in presets.split(",") if p.strip()]
    try:
        for p in plist:
            linear_shapes(p)
        dts = [dtype_name(d) for d in dtypes.split(",") if d.strip()]
        sps = [parse_pattern(s).name for s in sparsities.split(",") if s.strip()]
    except (PresetError, PatternError, QuantError) as e:
        _fail(str(e))
    if any(d not in ("fp8_e4m3", "int8") for d in dts):
        _fail(f"--dtypes must be fp8_e4m3 and/or int8 (presets: {', '.join(all_presets())})")
    ms = _ints(m, "m")
    fl = [f.strip() for f in forms.split(",") if f.strip()]
    if any(f not in ("eager", "traced", "in_op") for f in fl):
        _fail(f"--forms takes eager, traced and/or in_op, got {forms!r}")
    import triton
    from rich.progress import Progress

    from . import kernel as kb
    outdir = out or Path("results") / device_tag()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cusparselt": _cusparselt_version(), "cusparselt_loaded": _cusparselt_loaded(), "command": "slidesparse bench kernel " + " ".join(map(shlex.quote, _args_after("kernel")))}
    from ..kernels.dense import dense_kernel
    env["dense_kernel"] = {dt: dense_kernel(dt) for dt in dts}
    env["copy_gbs"] = kb.copy_bandwidth_gbs()
    rows: list = []
    try:
        with Progress() as prog:
            task = prog.add_task("kernel bench", total=len(plist) * 4 * len(ms) * len(dts))
            kb.run(plist, ms, dts, sps, rounds=rounds, search_min_m=search_min_m, rows=rows, forms=fl,
                   checkpoint=lambda rs: report.write_all(rs, {**env, "partial": True}, outdir, plot=False),
                   log=lambda s: prog.console.print(s),
                   progress=lambda i, n, d: prog.update(task, completed=i, description=d))
    except KeyboardInterrupt:  # keep what was measured, marked as partial
        env["partial"] = True
        typer.echo("interrupted: writing the partial report", err=True)
    if not rows:
        _fail("nothing was measured")
    for p in report.write_all(rows, env, outdir):
        typer.echo(p)


def _args_after(word: str) -> list[str]:
    return sys.argv[sys.argv.index(word) + 1:] if word in sys.argv else []


def _cusparselt_version():
    import torch
    try:
        v = torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001 - report what we can
        return None
    return v


def _cusparselt_loaded():
    from ..kernels import cslt_plan
    return cslt_plan.loaded_version_name()



_MATRIX = "--matrix"
_SINGLE = "default mode"


@app.command("e2e")
def e2e(
    matrix: bool = typer.Option(False, "--matrix", help="the prefill/decode sweep: one vLLM engine per (model, variant), "
                                                        "every M inside it (docs/performance.md, 'End-to-end matrix')"),
    out: Optional[Path] = typer.Option(None, help="output folder (matrix: default results/<device>/e2e_matrix; "
                                                  "default mode: required)"),
    variant: List[str] = typer.Option([], "--variant", help=f"{_SINGLE}: NAME=CHECKPOINT[::EXTRA VLLM ARGS], repeatable; "
                                                            "the first is the baseline"),
    workload: List[str] = typer.Option([], "--workload", help=f"{_SINGLE}: prefill and/or decode, repeatable"),
    title: str = typer.Option("", help=f"{_SINGLE}: report title"),
    timeout: float = typer.Option(600, help=f"{_SINGLE}: seconds per vllm bench throughput process"),
    models: Optional[str] = typer.Option(None, "--models", help=f"{_MATRIX}: comma-separated make-model presets "
                                         "(llama3.2-1b, qwen2.5-7b, ...), or labels whose checkpoints --base/--ckpt give"),
    variants: str = typer.Option(None, "--variants", help=f"{_MATRIX}: comma-separated, from bf16, fp8, int8 "
                                 "(dense W8A8 compressed-tensors), fp8-online, SP-DT (2_4-fp8, 2_8-int8, 2_6-bf16, ...); NAME#E "
                                 "measures NAME again in an engine of its own (fp8,2_8-fp8,fp8#2,2_8-fp8#2: "
                                 "engine-to-engine spread) (default: bf16,fp8,int8 and 2_4/2_6/2_8/2_10 in fp8 and int8)"),
    prefill_m: str = typer.Option(None, "--prefill-m", help=f"{_MATRIX}: tokens per prefill step "
                                  "(default: 512,1024,...,65536; '' for none)"),
    decode_m: str = typer.Option(None, "--decode-m", help=f"{_MATRIX}: concurrent decode sequences "
                                 "(default: 64,128,256,512; '' for none)"),
    ckpt_dir: Path = typer.Option(Path("models"), "--ckpt-dir", help=f"{_MATRIX}: where missing checkpoints are made"),
    ckpt: List[str] = typer.Option([], "--ckpt", help=f"{_MATRIX}: [MODEL:]VARIANT=PATH, an existing checkpoint "
                                                      "(used as is: not converted, tuned or deleted); repeatable"),
    base: List[str] = typer.Option([], "--base", help=f"{_MATRIX}: [MODEL=]PATH, the BF16 checkpoint to convert "
                                                      "from (default: make-model of the preset in --ckpt-dir)"),
    delete_after: bool = typer.Option(False, help=f"{_MATRIX}: delete each checkpoint this run made once its "
                                                   "points are done (the base stays for the next variant)"),
    delete_base: bool = typer.Option(False, help=f"{_MATRIX}: also delete a base this run made, after its model"),
    prepare_ahead: bool = typer.Option(False, help=f"{_MATRIX}: convert the next variant (low priority, a quarter "
                                                    "of the cores) while an engine measures; marked in the report"),
    standby: bool = typer.Option(True, "--standby/--no-standby", help=f"{_MATRIX}: start the next variant's worker "
                                 "(its vLLM import, about 17 s on the GPU host) while the current engine starts"),
    tune: Optional[bool] = typer.Option(None, "--tune/--no-tune", help=f"{_MATRIX}: `slidesparse tune` SlideSparse "
                                        "checkpoints that are not tuned (default: when a GPU is present)"),
    repeats: int = typer.Option(3, help=f"{_MATRIX}: timed run pairs per point (median kept)"),
    max_repeats: int = typer.Option(9, help=f"{_MATRIX}: more pairs, up to this many, while the point is noisy "
                                            "(--target-mad)"),
    target_mad: float = typer.Option(0.03, help=f"{_MATRIX}: a point is settled when the median absolute deviation "
                                                "of its per-step times is at most this fraction of their median"),
    min_window: float = typer.Option(0.5, help=f"{_MATRIX}: prefill: seconds of steps between the two runs"),
    min_steps: int = typer.Option(6, help=f"{_MATRIX}: prefill: at least this many steps between them"),
    max_steps: int = typer.Option(256, help=f"{_MATRIX}: prefill: at most this many steps between them"),
    decode_steps: int = typer.Option(256, help=f"{_MATRIX}: decode: steps between the two runs"),
    decode_warm_steps: int = typer.Option(8, help=f"{_MATRIX}: decode: steps of the short run"),
    prefill_len: int = typer.Option(2048, help=f"{_MATRIX}: prefill prompt length (min(M, this))"),
    decode_prompt_len: int = typer.Option(16, help=f"{_MATRIX}: decode prompt length"),
    engine_arg: List[str] = typer.Option([], "--engine-arg", help=f"{_MATRIX}: KEY=VALUE for every vLLM engine "
                                         "(LLM() keyword; VALUE parsed as JSON if it can be), repeatable"),
    enforce_eager: bool = typer.Option(False, help=f"{_MATRIX}: no torch.compile / CUDA graphs (CPU checks only)"),
    startup_timeout: float = typer.Option(1800, help=f"{_MATRIX}: seconds an engine may take to start"),
    point_timeout: float = typer.Option(900, help=f"{_MATRIX}: seconds a point may take"),
    retry_failed: bool = typer.Option(False, help=f"{_MATRIX}: run failed points again (finished ones are always skipped)"),
    fresh_run: bool = typer.Option(False, help=f"{_MATRIX}: measure again the points earlier runs in OUT measured "
                                               "(the report shows the latest, against baselines of its own run)"),
    clock_log: bool = typer.Option(True, "--clock-log/--no-clock-log",
                                   help=f"{_MATRIX}: log the GPU's SM clock and clock events (nvidia-smi, 100 ms) "
                                        "beside the sweep; the report flags points whose runs differ"),
    compile_cache: bool = typer.Option(False, "--compile-cache/--no-compile-cache",
                                       help=f"{_MATRIX}: keep vLLM's torch.compile cache (off: every engine compiles "
                                            "another checkpoint, so the cache is never read; start-up only)"),
    pin_cpus: Optional[str] = typer.Option(None, help=f"{_MATRIX}: 'auto' or ENGINE_CPUS/FRONT_CPUS (e.g. 4,20/5,21): "
                                           "vLLM's engine core and the front-end on CPUs of their own in every "
                                           "engine (host-bound points then do not depend on where Linux put them)"),
    crosscheck: bool = typer.Option(False, help=f"{_MATRIX}: also run `vllm bench throughput` at prefill "
                                                "--crosscheck-prefill-m and decode --crosscheck-decode-m per variant"),
    crosscheck_prefill_m: int = typer.Option(16384, help=f"{_MATRIX}: 0 for none"),
    crosscheck_decode_m: int = typer.Option(256, help=f"{_MATRIX}: 0 for none"),
    crosscheck_variants: Optional[str] = typer.Option(None, help=f"{_MATRIX}: comma-separated variants to "
                                                      "cross-check (default: every variant), e.g. fp8"),
    report_only: bool = typer.Option(False, help=f"{_MATRIX}: re-render the report from OUT/results.jsonl"),
    dry_run: bool = typer.Option(False, help=f"{_MATRIX}: print what would run and exit"),
):
    """End-to-end vLLM throughput. Default mode: one `vllm bench throughput` per --variant and
    --workload (e2e.json/md/png). --matrix: the prefill/decode sweep, resumable (results.jsonl,
    e2e_matrix.csv/json/md/png)."""
    if not matrix and not report_only:
        from .e2e import WORKLOADS, parse_variant, run
        if not variant or not workload:
            _fail("give --variant NAME=CHECKPOINT (one or more) and --workload prefill|decode, or use --matrix")
        if out is None:
            _fail("--out is required")
        bad = [w for w in workload if w not in WORKLOADS]
        if bad:
            _fail(f"unknown --workload {bad[0]!r}: choose from {', '.join(WORKLOADS)}")
        try:
            vs = [parse_variant(s) for s in variant]
        except ValueError as e:
            _fail(str(e))
        run(vs, list(dict.fromkeys(workload)), out, timeout=timeout, title=title)
        return
    _e2e_matrix(**{k: v for k, v in locals().items() if k not in ("matrix", "variant", "workload", "title", "timeout")})


def _e2e_matrix(out, models, variants, prefill_m, decode_m, ckpt_dir, ckpt, base, delete_after, delete_base,
                prepare_ahead, standby, tune,
                repeats, max_repeats, target_mad, min_window, min_steps, max_steps, decode_steps, decode_warm_steps,
                prefill_len, decode_prompt_len,
                engine_arg, enforce_eager, startup_timeout, point_timeout, retry_failed, fresh_run, clock_log, compile_cache,
                pin_cpus, crosscheck,
                crosscheck_prefill_m, crosscheck_decode_m, crosscheck_variants, report_only, dry_run):
    import json
    import signal

    from . import e2e_matrix as mx
    outdir = out or Path("results") / mx.device_tag() / "e2e_matrix"
    if report_only:
        if not (outdir / mx.RESULTS).is_file():
            _fail(f"no results file {outdir / mx.RESULTS}")
        for p in mx.write_report(outdir):
            typer.echo(p)
        return
    try:
        vlist = mx.parse_variants(variants if variants is not None else mx.DEFAULT_VARIANTS)
        pms = mx.parse_ms(prefill_m if prefill_m is not None else mx.DEFAULT_PREFILL_M, "prefill-m")
        dms = mx.parse_ms(decode_m if decode_m is not None else mx.DEFAULT_DECODE_M, "decode-m")
        if not models:
            raise mx.MatrixError("--models is required with --matrix (e.g. --models llama3.2-1b)")
        mlist = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
        eargs = {}
        for a in engine_arg:
            k, sep, val = a.partition("=")
            if not sep or not k.strip():
                raise mx.MatrixError(f"--engine-arg takes KEY=VALUE, got {a!r}")
            try:
                eargs[k.strip()] = json.loads(val)
            except ValueError:
                eargs[k.strip()] = val
        settings = mx.Settings(prefill_len=prefill_len, decode_prompt_len=decode_prompt_len, decode_steps=decode_steps,
                               decode_warm_steps=decode_warm_steps, repeats=repeats, max_repeats=max_repeats,
                               target_mad=target_mad, min_window_s=min_window,
                               min_steps=min_steps, max_steps=max_steps, enforce_eager=enforce_eager, engine_args=eargs)
        cc = []
        if crosscheck:
            cc = [(ph, m) for ph, m in (("prefill", crosscheck_prefill_m), ("decode", crosscheck_decode_m)) if m > 0]
        settings.validate(pms + [m for ph, m in cc if ph == "prefill"])
        cc_vars = None
        if crosscheck_variants is not None:
            cc_vars = [v.name for v in mx.parse_variants(crosscheck_variants)]
            named = {v.name for v in vlist}
            unknown = [n for n in cc_vars if n not in named]
            if unknown:
                raise mx.MatrixError(f"--crosscheck-variants {unknown[0]!r} is not in --variants")
        if not pms and not dms:
            raise mx.MatrixError("nothing to measure: --prefill-m and --decode-m are both empty")
        given = _pairs(ckpt, mlist, "--ckpt", mx, variant_key=True)
        bases = _pairs(base, mlist, "--base", mx)
        for (m, vname), p in given.items():
            if not (Path(p) / "config.json").is_file():
                raise mx.MatrixError(f"--ckpt {m}:{vname}={p}: no config.json there")
        for m, p in bases.items():
            if not (Path(p) / "config.json").is_file():
                raise mx.MatrixError(f"--base {m}={p}: no config.json there")
        if startup_timeout <= 0 or point_timeout <= 0:
            raise mx.MatrixError("timeouts must be positive")
        if pin_cpus:
            try:
                mx.cpu_pin.resolve(pin_cpus)
            except mx.cpu_pin.PinError as e:
                raise mx.MatrixError(str(e)) from None
    except mx.MatrixError as e:
        _fail(str(e))
    plan = mx.Plan(mlist, vlist, pms, dms, settings, crosscheck=cc, crosscheck_variants=cc_vars)
    ck = mx.Checkpoints(ckpt_dir, given=given, bases=bases, tune=tune, delete_after=delete_after)
    if dry_run:
        records, _ = mx.read_results(outdir / mx.RESULTS)
        done = mx.finished(records, settings.key(), retry_failed, run=mx.run_of(records + [{"kind": "session"}])[-1]
                           if fresh_run else None)
        for model in mlist:
            for v in vlist:
                todo = [p for p in plan.points() if (model, v.name, p["phase"], p["m"]) not in done]
                d = ck.path(model, v)
                typer.echo(f"{model} {v.name}: {len(todo)} of {len(plan.points())} point(s) to run; checkpoint {d} "
                           f"({'exists' if (d / 'config.json').is_file() else 'to make'})")
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # run without the top-level CLI's handlers: a kill ends the engines the way Ctrl-C does
        def _term(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _term)
    status = 0
    try:
        paths = mx.run_matrix(plan, outdir, ck, mx.Timeouts(startup_timeout, point_timeout), retry_failed=retry_failed,
                              delete_base=delete_base, log=lambda s: typer.echo(s, err=True),
                              prepare_ahead=prepare_ahead, standby=standby, fresh_run=fresh_run,
                              compile_cache=compile_cache, clock_log=clock_log, pin_cpus=pin_cpus)
    except BaseException as e:
        # Ctrl-C, or the top-level CLI's signal exception (a BaseException): the engine is already
        # stopped (run_engine's finally); keep the report current, then let the signal end the run
        if not isinstance(e, KeyboardInterrupt) and "Interrupt" not in type(e).__name__:
            raise
        typer.echo("interrupted: the results file keeps every finished point; writing the report", err=True)
        if (outdir / mx.RESULTS).exists():
            mx.write_report(outdir)
            typer.echo(mx.summary(mx.read_results(outdir / mx.RESULTS)[0]), err=True)
        if isinstance(e, KeyboardInterrupt):
            raise typer.Exit(130)
        raise
    records, _ = mx.read_results(outdir / mx.RESULTS)
    typer.echo(mx.summary(records))
    for p in paths:
        typer.echo(p)
    planned = {(m, v.name, p["phase"], p["m"]) for m in mlist for v in vlist for p in plan.points()}
    failed = [r for r in mx.latest(records, "point").values()
              if mx.point_key(r) in planned and r.get("settings") == settings.key() and not r.get("ok")]
    if failed and not status:
        typer.echo(f"{len(failed)} point(s) failed (see the report's Failures)", err=True)
        status = 1
    if status:
        raise typer.Exit(status)


def _pairs(items, models, flag, mx, variant_key=False) -> dict:
    """[MODEL:]VARIANT=PATH (variant_key) or [MODEL=]PATH items; the model may be left out with one --models."""
    out = {}
    for it in items:
        if variant_key:
            lhs, sep, path = it.partition("=")
            model, _, vname = lhs.rpartition(":")
            if not sep or not vname.strip() or not path.strip():
                raise mx.MatrixError(f"{flag} takes [MODEL:]VARIANT=PATH, got {it!r}")
            vname = mx.parse_variant(vname).name
        else:
            model, sep, path = it.rpartition("=")
            if not path.strip():
                raise mx.MatrixError(f"{flag} takes [MODEL=]PATH, got {it!r}")
        model = model.strip()
        if not model:
            if len(models) != 1:
                raise mx.MatrixError(f"{flag} {it!r}: name the model (MODEL:...) when --models lists several")
            model = models[0]
        elif model not in models:
            raise mx.MatrixError(f"{flag} {it!r}: model {model!r} is not in --models")
        out[(model, vname) if variant_key else model] = path.strip()
    return out


if __name__ == "__main__":
    app()
