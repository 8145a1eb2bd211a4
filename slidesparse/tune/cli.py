"""`slidesparse tune CKPT`: cuSPARSELt algorithm search, written into a checkpoint's tuning file."""

from pathlib import Path

import typer

# a group whose callback is the command, so that the CLI's `app.add_typer(tune_app, name="tune")`
# gives `slidesparse tune CKPT` (a plain command would need `slidesparse tune tune CKPT`)
app = typer.Typer(help="Tune cuSPARSELt algorithms for a checkpoint on this GPU.", no_args_is_help=True,
                  invoke_without_command=True, context_settings={"allow_interspersed_args": True})


@app.callback()
def tune(ckpt: Path = typer.Argument(..., help="a SlideSparse checkpoint folder"),
         m: str = typer.Option("16,64,256,1024,4096,16384", "--m", help="M bucket bounds"),
         tp: int = typer.Option(1, "--tp", help="tensor-parallel size the checkpoint will be served with")):
    """Search alg ids per layer shape and M bucket; mark buckets where the dense GEMM wins."""
    from rich.progress import Progress

    from .search import TuneError, tune_checkpoint
    try:
        buckets = tuple(sorted(int(t) for t in m.split(",") if t.strip()))
        if not buckets or buckets[0] < 1:
            raise ValueError
    except ValueError:
        typer.echo(f"error: --m takes comma-separated positive integers, got {m!r}", err=True)
        raise typer.Exit(2)
    if tp < 1:
        typer.echo(f"error: --tp must be at least 1, got {tp}", err=True)
        raise typer.Exit(2)
    if not ckpt.is_dir():
        typer.echo(f"error: {ckpt} is not a folder", err=True)
        raise typer.Exit(2)
    try:
        with Progress() as prog:
            task = prog.add_task("tuning", total=None)
            out = tune_checkpoint(ckpt, buckets,
                                  progress=lambda i, n, d: prog.update(task, completed=i, total=n, description=d),
                                  tp=tp)
    except TuneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {out}")
if __name__ == "__main__":
    app()
