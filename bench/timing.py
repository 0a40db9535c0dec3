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


def idle_gaps(kernels, host_ops, min_gap_us: float = 5.0, top: int = 12) -> str:
    """Where the GPU waited for the host inside a step. kernels: [(start_us, end_us)] of the GPU's kernels and
    copies; host_ops: [(start_us, end_us, name)] of the host's outermost ops (Python-level modules/functions or
    aten ops). Returns a few lines: the span from the first kernel to the last, the union of kernel time, the idle
    time (gaps of at least min_gap_us), and the host ops that overlapped the gaps most (by overlapped time)."""
    if not kernels:
        return "GPU idle: no CUDA kernels recorded"
    ks = sorted(kernels)
    span0, span1 = ks[0][0], max(e for _, e in ks)
    busy, gaps, cur_s, cur_e = 0.0, [], ks[0][0], ks[0][1]
    for s, e in ks[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_gap_us:
                gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    idle = sum(e - s for s, e in gaps)
    by_op = {}
    for gs, ge in gaps:
        for s, e, name in host_ops:
            o = min(e, ge) - max(s, gs)
            if o > 0:
                by_op[name] = by_op.get(name, 0.0) + o
    lines = [f"GPU idle: span {(span1 - span0) / 1e3:.2f} ms, kernels busy {busy / 1e3:.2f} ms, idle "
             f"{idle / 1e3:.2f} ms in {len(gaps)} gaps of >= {min_gap_us:g} us; host ops during the gaps (ms):"]
    for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {t / 1e3:7.3f}  {name[:110]}")
    return "\n".join(lines)


def gpu_idle(events, min_gap_us: float = 5.0) -> str:
    """idle_gaps() of a torch.profiler profile's events(): kernels/copies on the device, and the host's outermost
    ops (aten ops, autograd's evaluate_function records, record_function ranges; Python-frame events are skipped,
    their ops counted instead)."""
    from torch.autograd import DeviceType

    def python_frame(e):
        return ".py(" in e.name or e.name.startswith("<") or e.name.startswith("ProfilerStep")

    def outermost(e):
        par = e.cpu_parent
        while par is not None:
            if not python_frame(par):
                return False
            par = par.cpu_parent
        return True

    kernels, host = [], []
    for e in events:
        tr = e.time_range
        if e.device_type == DeviceType.CUDA:
            kernels.append((tr.start, tr.end))
        elif e.device_type == DeviceType.CPU and not python_frame(e) and outermost(e):
            host.append((tr.start, tr.end, e.name))
    return idle_gaps(kernels, host, min_gap_us)
