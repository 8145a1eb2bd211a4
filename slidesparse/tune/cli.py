"""`slidesparse tune`: cuSPARSELt algorithm search, written into a checkpoint's tuning file."""

import typer

app = typer.Typer(help="Tune cuSPARSELt algorithms for a checkpoint on this GPU.", no_args_is_help=True)
