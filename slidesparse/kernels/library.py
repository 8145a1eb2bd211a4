"""Registering SlideSparse's custom ops with little host overhead.

    @op("slidesparse::name")          def f(...) -> Tensor: ...   (the schema comes from the annotations)
    @f.register_fake                  def _(...): ...             (shapes for torch.compile)

`torch.library.custom_op` routes every call through an autograd wrapper and checks that no output
aliases an input: on this repository's CPU machine a call with the linear's 14 arguments took
33 us, against 13 us for the same Python function registered with `torch.library.Library` (and
2 us for an aten op; tools/bench_op_overhead.py, results/cpu/op_overhead.txt). Outside CUDA graphs (vLLM replays graphs only up to its largest capture
size, 512 tokens by default) each layer's op call is host time on the step's critical path: on
the H200 a Llama-3.2-1B prefill step at 1024-4096 tokens runs host-bound, and our layers cost
about 0.1 ms of host time each more than stock vLLM's (results/H200/history/matrix_session_2026-12-02f).
So the ops are defined as vLLM defines its own (`direct_register_custom_op`): the schema, one
implementation for the CPU and CUDA keys, a fake; no autograd (inference only).
"""

from __future__ import annotations

import torch

__all__ = ["op", "raw_stream"]

_LIBS: dict[str, torch.library.Library] = {}


class Op:
    """What @op returns: the op is called as torch.ops.NS.NAME; this only takes its fake."""

    def __init__(self, qualname: str, lib: torch.library.Library):
        self.qualname = qualname
        self._lib = lib

    def register_fake(self, fake):
        torch.library.register_fake(self.qualname, fake, lib=self._lib)
        return fake


def op(qualname: str):
    """Define `qualname` (namespace::name) from the decorated function's annotations; nothing it
    takes is mutated."""
    ns, name = qualname.split("::")

    def register(fn) -> Op:
        lib = _LIBS.get(ns)
        if lib is None:
            lib = _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
        lib.define(name + torch.library.infer_schema(fn, mutates_args=()))
        for key in ("CPU", "CUDA"):
            lib.impl(name, fn, key)
        return Op(qualname, lib)
    return register


def raw_stream(device: int) -> int:
    """The current CUDA stream's handle on `device`, for the ctypes-bound kernels.
    torch.cuda.current_stream() builds a Stream object on each call (5-7 us on the H200 host,
    tools/gpu_host_cost.py); the raw handle is what Inductor's generated code asks for."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream
