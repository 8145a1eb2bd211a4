"""`slidesparse bench ...` commands (kernel and end-to-end benchmarks)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

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
    import triton
    from rich.progress import Progress

    from . import kernel as kb
    outdir = out or Path("results") / device_tag()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cusparselt": _cusparselt_version(), "cusparselt_loaded": _cusparselt_loaded(), "command": "slidesparse bench kernel " + " ".join(map(shlex.quote, _args_after("kernel")))}
    env["copy_gbs"] = kb.copy_bandwidth_gbs()
    rows: list = []
    try:
        with Progress() as prog:
            task = prog.add_task("kernel bench", total=len(plist) * 4 * len(ms) * len(dts))
            kb.run(plist, ms, dts, sps, rounds=rounds, search_min_m=search_min_m, rows=rows,
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
    return cslt_plan.loaded_version()


if __name__ == "__main__":
    app()
