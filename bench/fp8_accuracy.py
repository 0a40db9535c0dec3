"""FP8 against BF16 training: the same model, data and seed, N steps each, loss curves side by side.

    python bench/fp8_accuracy.py --steps 300 --out bench/results_fp8_accuracy.md        # H200
    python bench/fp8_accuracy.py --smoke                                                   # CPU: tiny, 6 steps

Each precision is one `python -m megatron_dsv3.train` process (the built-in corpus, no download) writing
TensorBoard; the table gives the training loss every `--every` steps, the mean of the last 20 steps of each, and
FP8's relative difference (the paper: within 0.25% of BF16 on its 16B/230B runs), plus steps/s of each.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--model", default="--preset proxy-1gpu --num-layers 4 --seq-length 1024 --mtp-num-layers 1",
                   help="model flags of megatron_dsv3.train")
    p.add_argument("--batch", default="--micro-batch-size 4 --global-batch-size 16")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.every, a.model, a.batch = 6, 2, "--preset tiny --cpu", "--micro-batch-size 2 --global-batch-size 4"
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("BF16", []), ("FP8", ["--fp8", "--fp8-backend", "native"])):
            tb = os.path.join(tmp, name)
            cmd = ([sys.executable, "-m", "megatron_dsv3.train"] + a.model.split() + a.batch.split()
                   + ["--train-iters", str(a.steps), "--lr", "3e-4", "--lr-warmup-iters", str(max(1, a.steps // 10)),
                      "--seed", "1234", "--log-interval", "1", "--tensorboard-dir", tb, "--no-progress-bar",
                      "--no-save-final", "--eval-interval", str(10 * a.steps)] + extra)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{name} run failed (rc {proc.returncode})")
            runs[name] = {"loss": losses(tb), "wall": wall, "banner": [l for l in proc.stdout.splitlines()
                                                                        if "FP8" in l or "fp8" in l][:2]}
            print(name, f"{wall:.0f} s", flush=True)
    b, f = runs["BF16"]["loss"], runs["FP8"]["loss"]
    last = sorted(b)[-20:]
    mb = sum(b[s] for s in last) / len(last)
    mf = sum(f[s] for s in last) / len(last)
    now = datetime.datetime.now(datetime.timezone.utc)
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = [f"# FP8 vs BF16 training ({now:%Y-%m-%d %H:%M} UTC, {dev}, torch {torch.__version__})", "",
             f"model: `{a.model}`, batch: `{a.batch}`, {a.steps} steps, lr 3e-4 (warmup {max(1, a.steps // 10)}), "
             f"seed 1234, built-in corpus; FP8 = `--fp8 --fp8-backend native`", "",
             f"mean training loss of the last {len(last)} steps: BF16 {mb:.4f}, FP8 {mf:.4f}, FP8 relative "
             f"difference **{100 * (mf - mb) / mb:+.3f}%** (paper: within 0.25%)", "",
             f"wall time per run (incl. start-up): BF16 {runs['BF16']['wall']:.0f} s, FP8 {runs['FP8']['wall']:.0f} s", "",
             "| step | BF16 loss | FP8 loss | relative |", "|---|---|---|---|"]
    for s in sorted(b):
        if s % a.every == 0 or s == max(b):
            if s in f:
                lines.append(f"| {s} | {b[s]:.4f} | {f[s]:.4f} | {100 * (f[s] - b[s]) / b[s]:+.2f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
