"""`slidesparse tune CKPT [CKPT ...]`: per layer shape and M bucket, sparse or dense, measured on
this GPU and written into each checkpoint's tuning file."""

from pathlib import Path
from typing import List

import typer

# a group whose callback is the command, so that the CLI's `app.add_typer(tune_app, name="tune")`
# gives `slidesparse tune CKPT` (a plain command would need `slidesparse tune tune CKPT`)
app = typer.Typer(help="Tune a checkpoint's GEMM choices on this GPU.", no_args_is_help=True,
                  invoke_without_command=True, context_settings={"allow_interspersed_args": True})


@app.callback()
def tune(ckpts: List[Path] = typer.Argument(..., help="SlideSparse checkpoint folders (several: the dense "
                                                       "measurements are shared)"),
         m: str = typer.Option("", "--m", help="M bucket bounds (default: tune.search.M_BUCKETS, "
                                              "16,64,128,256,512,1024,4096,16384)"),
         tp: int = typer.Option(1, "--tp", help="tensor-parallel size the checkpoints will be served with"),
         mixed_min_gain: float = typer.Option(
             0.05, "--mixed-min-gain",
             help="how much of the dense time (mean over the buckets) a layer plan that keeps two weight copies "
                  "must save beyond the best one-copy plan; 0 takes the fastest mix, 0.99 never mixes"),
         max_bucket_loss: float = typer.Option(
             0.02, "--max-bucket-loss",
             help="how much slower than dense (a fraction of its time) a one-copy sparse plan may be at any "
                  "M bucket that counts; larger values trade decode or prefill speed at some M for one "
                  "weight copy"),
         objective: str = typer.Option(
             "balanced", "--objective",
             help="what the plans are chosen for: balanced (every M bucket alike), prefill (buckets above "
                  "M=256 only) or decode (buckets up to M=256 only)"),
         graph_max_m: int = typer.Option(
             512, "--graph-max-m",
             help="the engine's largest CUDA-graph capture size (vLLM's max_cudagraph_capture_size, 512 by "
                  "default): buckets up to it are timed from graph replays, larger ones from back-to-back "
                  "launches, where the host time of a layer counts")):
    """Search cuSPARSELt algorithms per layer shape and M bucket, time the sparse and dense forms
    as vLLM runs them, and mark each bucket sparse or dense."""
    from rich.progress import Progress

    from .search import M_BUCKETS, TuneError, bucket_weights, tune_checkpoints
    try:
        buckets = tuple(sorted({int(t) for t in m.split(",") if t.strip()})) if m.strip() else M_BUCKETS
        if not buckets or buckets[0] < 1 or buckets[-1] > 1 << 24:
            raise ValueError
    except ValueError:
        typer.echo(f"error: --m takes comma-separated integers in [1, 16777216], got {m!r}", err=True)
        raise typer.Exit(2)
    if not 1 <= tp <= 1024:
        typer.echo(f"error: --tp must be in [1, 1024], got {tp}", err=True)
        raise typer.Exit(2)
    try:
        bucket_weights(buckets, objective)
    except TuneError as e:
        typer.echo(f"error: --{e}", err=True)
        raise typer.Exit(2)
    if not 0 <= graph_max_m <= 1 << 24:
        typer.echo(f"error: --graph-max-m must be in [0, 16777216], got {graph_max_m}", err=True)
        raise typer.Exit(2)
    if not 0 <= mixed_min_gain < 1:  # also false for nan
        typer.echo(f"error: --mixed-min-gain must be in [0, 1), got {mixed_min_gain}", err=True)
        raise typer.Exit(2)
    if not max_bucket_loss >= 0:  # also false for nan
        typer.echo(f"error: --max-bucket-loss must be >= 0, got {max_bucket_loss}", err=True)
        raise typer.Exit(2)
    for ckpt in ckpts:
        if not ckpt.is_dir():
            typer.echo(f"error: {ckpt} is not a folder", err=True)
            raise typer.Exit(2)
    try:
        with Progress() as prog:
            task = prog.add_task("tuning", total=None)
            out = tune_checkpoints(list(ckpts), buckets,
                                   progress=lambda i, n, d: prog.update(task, completed=i, total=n, description=d),
                                   tp=tp, mixed_min_gain=mixed_min_gain, objective=objective,
                                   graph_max_m=graph_max_m, max_bucket_loss=max_bucket_loss)
    except TuneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    from ..convert.inspect import inspect_checkpoint
    from ..core.tuning import plan_lines
    for ckpt, p in zip(ckpts, out):
        typer.echo(f"wrote {p}")
        # what the table will serve (as `slidesparse inspect` says it), so a plan that gains
        # nothing is seen now, not after a benchmark
        for line in plan_lines(inspect_checkpoint(ckpt)["tuning"]["plan"]):
            typer.echo(line)


if __name__ == "__main__":
    app()
