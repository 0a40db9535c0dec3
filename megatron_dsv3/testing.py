"""The test harness: code under torch.distributed (gloo, 127.0.0.1) with megatron-core's parallel state, on CPU.

Built on megatron_dsv3/launch.py (production code imports that module, never this one).
`run_distributed(fn, world_size, tp=, pp=, ep=)` is `launch.run_ranks` with the tests' name and a
shorter default timeout: one process per rank, the CPU shim and parallel_state in each, `fn(rank, **kwargs)`,
every rank's result back; any rank's failure fails the call with that rank's traceback. `fn` must be a
module-level function (it is pickled by name).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from megatron_dsv3.launch import (RankFailure, destroy_parallel_state, free_port, init_parallel_state,  # noqa: F401
                                  run_ranks, single_process)

# a rank's failure (tests match on it); launch.py raises bad input (ValueError/OSError) as itself
DistributedTestError = RankFailure


def run_distributed(fn: Callable[..., Any], world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1,
                    etp: int = 1, vpp: Optional[int] = None, seed: int = 1234, timeout: float = 180,
                    **kwargs) -> List[Any]:
    """fn(rank, **kwargs) on `world_size` gloo ranks; returns the per-rank results in rank order."""
    return run_ranks(fn, world_size, tp=tp, pp=pp, ep=ep, cp=cp, etp=etp, vpp=vpp, seed=seed, timeout=timeout,
                     **kwargs)


__all__ = ["run_distributed", "single_process", "init_parallel_state", "destroy_parallel_state", "free_port",
           "DistributedTestError"]
