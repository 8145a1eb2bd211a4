"""Host time of one custom-op call with the SlideSparse linear's schema (14 arguments), registered
two ways, against an aten op: why kernels/library.py defines ops through torch.library.Library.

    .venv/bin/python tools/bench_op_overhead.py > results/cpu/op_overhead.txt

CPU tensors and a trivial body, so the figures are the dispatch alone (microseconds per call).
"""

import platform
import time
from typing import Optional

import torch

SCHEMA_ARGS = ("Tensor codes, Tensor s_tok, Tensor? w, Tensor ws, Tensor? b, Tensor? wd, SymInt n, str sp, "
               "SymInt[] plan, ScalarType dt, Tensor? a, Tensor? c, SymInt k, str cfg")


@torch.library.custom_op("ovh::custom_op", mutates_args=())
def via_custom_op(codes: torch.Tensor, s_tok: torch.Tensor, w: Optional[torch.Tensor], ws: torch.Tensor,
                  b: Optional[torch.Tensor], wd: Optional[torch.Tensor], n: int, sp: str, plan: list[int],
                  dt: torch.dtype, a: Optional[torch.Tensor], c: Optional[torch.Tensor], k: int,
                  cfg: str) -> torch.Tensor:
    return codes.clone()


_lib = torch.library.Library("ovh", "FRAGMENT")
_lib.define(f"library({SCHEMA_ARGS}) -> Tensor")
_lib.impl("library", lambda codes, *rest: codes.clone(), "CPU")


def per_call_us(fn, n=20000):
    for _ in range(1000):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main():
    x = torch.zeros(4, 4)
    plan = [64, 1, 0, 1, 256, 1, 0, 1, 2048, 1, 0, 1, 16384, 1, 0, 1]
    args = (x, x, None, x, None, x, 8, "2_8", plan, torch.bfloat16, None, None, 0, "")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, us per call")
    print(f"torch.library.custom_op  {per_call_us(lambda: torch.ops.ovh.custom_op(*args)):6.1f}")
    print(f"torch.library.Library    {per_call_us(lambda: torch.ops.ovh.library(*args)):6.1f}")
    print(f"aten clone (reference)   {per_call_us(lambda: x.clone()):6.1f}")


if __name__ == "__main__":
    main()
