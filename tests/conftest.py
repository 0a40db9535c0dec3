"""Shared fixtures: megatron-core parallel state in this process, markers, deterministic CPU settings."""
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron-core's MoE is torch.compile-wrapped: 20+ s cold on CPU

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter: set before any @triton.jit is decorated, so the
# kernel tests (fixture `triton_device`) check the same kernel source on this machine that the GPU compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mcore_single():
    """gloo world size 1 + megatron-core parallel_state (TP=PP=EP=1), torn down after the test."""
    from megatron_dsv3.testing import single_process
    with single_process():
        yield


@pytest.fixture
def mcore_parallel():
    """A factory: `with mcore_parallel(tp=.., ep=..)` for single-process parallel_state variants."""
    from megatron_dsv3.testing import single_process
    return single_process


@pytest.fixture
def triton_device():
    """'cuda' where CUDA is; else 'cpu' with Triton's interpreter (TRITON_INTERPRET=1, set above); else skip."""
    if torch.cuda.is_available():
        return "cuda"
    pytest.importorskip("triton", reason="Triton is not installed (pip install '.[dev]' brings it)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not in effect when the kernels were defined")
    return "cpu"
