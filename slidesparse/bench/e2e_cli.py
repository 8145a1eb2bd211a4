"""python -m slidesparse.bench.e2e_cli: the end-to-end benchmark without the typer app (used on hosts
where only the module path is handy; `slidesparse bench e2e` is the same thing)."""

import argparse
from pathlib import Path

from .e2e import WORKLOADS, parse_variant, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", action="append", required=True, help="NAME=CHECKPOINT[::EXTRA VLLM ARGS]; first is the baseline")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)
    variants = [parse_variant(s) for s in a.variant]
    run(variants, a.workload, Path(a.out), timeout=a.timeout, title=a.title)


if __name__ == "__main__":
    main()
