"""Step time of the trainer with and without the host EMA of the parameters (--ema-decay, training/ema.py).

    python bench/bench_ema.py                       # tiny preset, CPU (or CUDA where there is one), 20 steps each
    python bench/bench_ema.py --steps 40 --preset tiny --seq-length 128

Two trainers (same seed, same data) run alternately, one step each, so that load from other processes hits both
alike. Reported per variant: the median step time; for the EMA run also the time the training thread spent in
the EMA's code (the stall: the wait before the optimizer step + launching the update) and the time a full update
takes in the background. Overhead = (median with EMA / median without - 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decay", type=float, default=0.999)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args(argv)

    import torch
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer

    base = ["--preset", a.preset, "--train-iters", str(a.steps + a.warmup + 1), "--eval-interval", "0",
            "--eval-iters", "0", "--generate-tokens", "0", "--no-progress-bar", "--log-interval", "1000000"]
    for flag in ("seq_length", "micro_batch_size", "global_batch_size"):
        if getattr(a, flag) is not None:
            base += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if a.cpu:
        base.append("--cpu")
    plain = Trainer(parse_args(base))
    with_ema = Trainer(parse_args(base + ["--ema-decay", str(a.decay)]))
    ema = with_ema.ema

    # the training thread's time inside the EMA (wrapping the two calls the trainer makes)
    stall = []
    orig_before, orig_update = ema.before_optimizer_step, ema.update

    def before():
        t0 = time.perf_counter()
        orig_before()
        stall.append(time.perf_counter() - t0)

    def update():
        t0 = time.perf_counter()
        orig_update()
        stall.append(time.perf_counter() - t0)

    ema.before_optimizer_step, ema.update = before, update

    def sync():
        if torch.cuda.is_available() and not a.cpu:
            torch.cuda.synchronize()

    times = {"plain": [], "ema": []}
    for i in range(a.warmup + a.steps):
        for name, t in (("plain", plain), ("ema", with_ema)):
            sync()
            t0 = time.perf_counter()
            t.train_step()
            sync()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    ema.wait()
    stall_per_step = sum(stall[2 * a.warmup:]) / a.steps
    # one full update, waited for (what the background thread does per step)
    t0 = time.perf_counter()
    orig_update()
    ema.wait()
    full_update = time.perf_counter() - t0

    mp, me = statistics.median(times["plain"]), statistics.median(times["ema"])
    n_params = sum(e.numel() for es in ema.ema for e in es)
    print(f"preset {a.preset} | device {plain.device.type} | {n_params / 1e6:.2f}M parameters "
          f"({n_params * 4 / 2 ** 20:.1f} MiB fp32 EMA) | {a.steps} steps each, alternating | "
          f"torch threads {torch.get_num_threads()}")
    print(f"median step: without EMA {mp * 1e3:.1f} ms | with EMA {me * 1e3:.1f} ms | overhead "
          f"{100 * (me / mp - 1):+.2f}%")
    print(f"mean step: without {statistics.mean(times['plain']) * 1e3:.1f} ms | with "
          f"{statistics.mean(times['ema']) * 1e3:.1f} ms")
    print(f"training thread inside the EMA per step (stall): {stall_per_step * 1e3:.3f} ms "
          f"({100 * stall_per_step / mp:.2f}% of a step) | one update done synchronously: {full_update * 1e3:.2f} ms "
          f"({100 * full_update / mp:.2f}% of a step)")


if __name__ == "__main__":
    main()
