"""The one timing loop of the benchmarks: warmup, then per-step milliseconds (CUDA events on GPU, wall clock on
CPU), the peak-memory counter reset after the warmup so it covers the timed steps only."""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch


def time_steps(step: Callable[[], None], warmup: int, iters: int,
               before_each: Optional[Callable[[], None]] = None) -> List[float]:
    """Run step() `warmup` times, then `iters` timed times; returns each timed step's ms. before_each (e.g. a
    barrier across ranks) runs before every timed step, outside the timing."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times
