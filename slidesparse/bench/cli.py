"""`slidesparse bench ...` commands (kernel and end-to-end benchmarks)."""

import typer

app = typer.Typer(help="Kernel and end-to-end benchmarks; results go under results/<device>/.", no_args_is_help=True)
