"""Shared test setup.

GPU tests (marker `gpu`) need CUDA with 2:4 sparse tensor cores; on other machines they are
reported as skipped with that reason (pytest -ra lists them), never silently dropped.
"""

import signal

import pytest
import torch

from slidesparse.convert import make_model

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored,
# and ignored signals stay ignored across exec: every child the tests interrupt with SIGINT (the
# CLI's Ctrl-C contract, the e2e driver's resumability) would then run on, and one of them writes
# until the disk is full. A handler here is reset to the default in each child at exec.
signal.signal(signal.SIGINT, signal.default_int_handler)


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (sm >= 8.0); run on the GPU host: see docs/gpu-host.md")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """preset -> directory of a freshly generated tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for p in ("tiny-llama", "tiny-qwen2", "tiny-bitnet"):
        make_model(p, root / p, seed=11)
        out[p] = root / p
    return out
