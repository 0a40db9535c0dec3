"""Shared fixtures: megatron-core parallel state in this process, markers, deterministic CPU settings."""
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron-core's MoE is torch.compile-wrapped: 20+ s cold on CPU

import pytest
import torch

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
