"""Step time of DualPipe's forward&backward pair with and without Figure 4's overlap (pipeline/overlap.py), on CPU
with gloo and a cost model: fixed compute time per sub-stage and a delayed all-to-all.

    python bench/bench_overlap.py                          # 2 EP ranks, 4 layers, compute 2 ms F / 4 ms B, a2a 3 ms
    python bench/bench_overlap.py --layers 4 --fwd-ms 2 --bwd-ms 4 --a2a-ms 3 --repeats 7

The layers are `CostLayer`s, LayerStages whose ATTENTION and MLP are a matmul followed by a sleep of --fwd-ms in
forward and --bwd-ms in backward (sleeps release the CPU, so other processes on the machine barely disturb them),
and whose DISPATCH and COMBINE are moe/dispatch.py's real asynchronous all-to-all over the EP group (gloo), each
completing --a2a-ms after it was posted, one after another on a serial link per rank (`DelayedLink`: the model of
a network; the bytes really move through gloo too). One micro-batch B is forwarded (not timed); then the pair
(forward of A, backward of B) is timed: "F then B" runs the two one after the other (order "sequential": every
all-to-all waited right after it is posted), "overlapped" in Figure 4's order. Per pair: the slowest rank's
wall time; the median over --repeats, each variant alternating.

The first row runs without any all-to-all (the floor: compute, sleeps' overshoot, Python); "comm exposed" is each
variant's time above that floor. Expected, per layer: F then B = 2 F + 2 B compute + 4 all-to-alls;
overlapped ~ the compute alone while an all-to-all is shorter than the compute it hides behind (one all-to-all
at each end of the pair has nothing to hide behind).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


class DelayedLink:
    """Wraps torch.distributed.all_to_all_single: an async all-to-all completes `delay` seconds after it is posted,
    queued behind the previous one (a serial link); the real gloo work runs meanwhile and is waited too."""

    def __init__(self, delay: float):
        self.delay, self.free_at, self.lock = delay, 0.0, threading.Lock()
        self.real = torch.distributed.all_to_all_single

    def __call__(self, *args, async_op: bool = False, **kwargs):
        work = self.real(*args, async_op=async_op, **kwargs)
        if not async_op:
            return work
        with self.lock:
            self.free_at = max(time.perf_counter(), self.free_at) + self.delay
            done_at = self.free_at
        return _DelayedWork(work, done_at)


class _DelayedWork:
    def __init__(self, work, done_at):
        self.work, self.done_at = work, done_at

    def wait(self, *args, **kwargs):
        left = self.done_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return self.work.wait(*args, **kwargs)


class _Cost(torch.autograd.Function):
    """Identity that costs `fwd` seconds in forward and `bwd` in backward (backward incl. the weight gradient)."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        time.sleep(fwd)
        ctx.bwd = bwd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g, None, None


class CostLayer(torch.nn.Module):
    """LayerStages with fixed costs: ATTENTION and MLP a matmul + sleep, DISPATCH/COMBINE an even all-to-all."""

    def __init__(self, h: int, group, fwd: float, bwd: float, local: bool = False):
        super().__init__()
        self.wa = torch.nn.Parameter(torch.randn(h, h) / h ** 0.5)
        self.wm = torch.nn.Parameter(torch.randn(h, h) / h ** 0.5)
        self.group, self.fwd, self.bwd, self.local = group, fwd, bwd, local
        self.ep = torch.distributed.get_world_size(group)

    def _splits(self, rows):
        return [rows // self.ep] * self.ep

    def attention(self, st):
        return {"residual": st["hidden"], "tokens": _Cost.apply(st["hidden"] @ self.wa, self.fwd, self.bwd)}

    def dispatch(self, st):
        return self._a2a(st["tokens"])

    def mlp(self, st):
        return {"routed": _Cost.apply(torch.tanh(st["dispatched"] @ self.wm), self.fwd, self.bwd)}

    def combine(self, st):
        return self._a2a(st["routed"])

    def _a2a(self, x):
        from megatron_dsv3.moe.dispatch import Pending, all_to_all
        if self.local:                                  # the floor: no communication at all
            return Pending(x.view_as(x))
        s = self._splits(x.shape[0])
        return all_to_all(x, s, s, self.group, async_op=True)

    def output(self, st):
        return st["residual"] + st["combined"]


class CostStack(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def overlap_pieces(self):
        return list(self.layers)


def _rank(rank, layers, tokens, hidden, fwd_ms, bwd_ms, a2a_ms, repeats):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron_dsv3.pipeline.overlap import ChunkRun, overlap_pieces, run_interleaved
    group = ps.get_expert_model_parallel_group()
    torch.manual_seed(0)
    stack = CostStack([CostLayer(hidden, group, fwd_ms / 1e3, bwd_ms / 1e3, local=a2a_ms is None)
                       for _ in range(layers)])
    pieces = overlap_pieces(stack)
    link = DelayedLink((a2a_ms or 0.0) / 1e3)
    dist.all_to_all_single = link
    times = {"sequential": [], "figure4": []}
    try:
        for i in range(repeats + 1):                   # the first round warms up
            for order in (("sequential", "figure4") if i % 2 == 0 else ("figure4", "sequential")):
                xa = torch.randn(tokens, hidden, requires_grad=True)
                xb = torch.randn(tokens, hidden, requires_grad=True)
                run_b = ChunkRun(pieces, [xb])
                run_b.run_forward()
                run_a = ChunkRun(pieces, [xa])
                dist.barrier(group)
                link.free_at = 0.0
                t0 = time.perf_counter()
                run_interleaved(run_a.forward(), run_b.backward(run_b.outputs, [torch.ones_like(xb)]), order)
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
                if i > 0:
                    times[order].append(float(dt))
                run_a.run_backward(run_a.outputs, [torch.ones_like(xa)])
                stack.zero_grad()
    finally:
        dist.all_to_all_single = link.real
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--fwd-ms", type=float, default=2.0, help="compute of ATTENTION / MLP forward")
    p.add_argument("--bwd-ms", type=float, default=4.0, help="compute of ATTENTION / MLP backward (B + W)")
    p.add_argument("--a2a-ms", type=float, nargs="+", default=[0.0, 1.0, 3.0, 6.0],
                   help="all-to-all latencies to measure (each a row)")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    from megatron_dsv3.launch import run_ranks
    L, f, b = a.layers, a.fwd_ms, a.bwd_ms
    compute = L * 2 * (f + b)
    print(f"# F&B pair, {L} layers, EP={a.ep} gloo ranks, CPU; compute per sub-stage {f} ms F / {b} ms B; "
          f"median of {a.repeats}, slowest rank\n")
    print("| all-to-all | modelled compute | modelled comm | F then B | overlapped | speed-up | comm exposed: "
          "F then B -> overlapped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    floor = None
    for d in [None] + list(a.a2a_ms):
        res = run_ranks(_rank, a.ep, ep=a.ep, timeout=600, layers=L, tokens=a.tokens, hidden=a.hidden,
                        fwd_ms=f, bwd_ms=b, a2a_ms=d, repeats=a.repeats)[0]
        seq, ovl = res["sequential"], res["figure4"]
        if d is None:       # no communication: what compute + the framework cost (the floor of both variants)
            floor = min(seq, ovl)
            print(f"| none (floor) | {compute:g} ms | 0 | {seq:.1f} ms | {ovl:.1f} ms | - | - |", flush=True)
            continue
        exposed = f"{seq - floor:.1f} -> {max(ovl - floor, 0.0):.1f} ms"
        print(f"| gloo + {d:g} ms | {compute:g} ms | {L * 4 * d:g} ms | {seq:.1f} ms | {ovl:.1f} ms | "
              f"{seq / ovl:.2f}x | {exposed} |", flush=True)


if __name__ == "__main__":
    main()
