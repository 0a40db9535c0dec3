"""FP8 against BF16 training: the same model, data and seed, N steps each, loss curves side by side.

    python bench/fp8_accuracy.py --steps 300 --out bench/results_fp8_accuracy.md        # H200
    python bench/fp8_accuracy.py --steps 300 --parallel --time-limit 500 --out F           # one device call
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
    p.add_argument("--parallel", action="store_true", help="run BF16 and FP8 at the same time (one device)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop the runs there, report what ran")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.every, a.model, a.batch = 6, 2, "--preset tiny --cpu", "--micro-batch-size 2 --global-batch-size 4"
    runs = {}
    variants = (("BF16", []), ("FP8", ["--fp8", "--fp8-backend", "native"]))
    with tempfile.TemporaryDirectory() as tmp:
        def command(name, extra):
            return ([sys.executable, "-m", "megatron_dsv3.train"] + a.model.split() + a.batch.split()
                    + ["--train-iters", str(a.steps), "--lr", "3e-4", "--lr-warmup-iters", str(max(1, a.steps // 10)),
                       "--seed", "1234", "--log-interval", "1", "--tensorboard-dir", os.path.join(tmp, name),
                       "--no-progress-bar", "--no-save-final", "--eval-interval", str(10 * a.steps)] + extra)

        # --parallel: both runs at once on one device (halves the wall time of a device call; their steps/s then
        # share the GPU and are not speeds). --time-limit: stop both there and report the steps reached.
        groups = [variants] if a.parallel else [(v,) for v in variants]
        t_start = time.perf_counter()
        for group in groups:
            procs = {}
            for name, extra in group:
                log = open(os.path.join(tmp, name + ".log"), "w+")
                procs[name] = (subprocess.Popen(command(name, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                                text=True), log, time.perf_counter())
            for name, (proc, log, t0) in procs.items():
                left = None if a.time_limit is None else max(1.0, a.time_limit - (time.perf_counter() - t_start))
                try:
                    rc = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = "stopped at --time-limit"
                wall = time.perf_counter() - t0
                log.seek(0)
                out = log.read()
                if rc not in (0, "stopped at --time-limit"):
                    print(out[-4000:])
                    raise SystemExit(f"{name} run failed (rc {rc})")
                runs[name] = {"loss": losses(os.path.join(tmp, name)), "wall": wall, "stopped": rc != 0}
                print(name, f"{wall:.0f} s", "(stopped at --time-limit)" if rc else "", flush=True)
    b, f = runs["BF16"]["loss"], runs["FP8"]["loss"]
    common = sorted(set(b) & set(f))
    if not common:
        raise SystemExit("no step logged by both runs")
    last = common[-20:]
    mb = sum(b[s] for s in last) / len(last)
    mf = sum(f[s] for s in last) / len(last)
    now = datetime.datetime.now(datetime.timezone.utc)
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = [f"# FP8 vs BF16 training ({now:%Y-%m-%d %H:%M} UTC, {dev}, torch {torch.__version__})", "",
             f"model: `{a.model}`, batch: `{a.batch}`, {a.steps} steps, lr 3e-4 (warmup {max(1, a.steps // 10)}), "
             f"seed 1234, built-in corpus; FP8 = `--fp8 --fp8-backend native`", "",
             f"mean training loss of the last {len(last)} steps both ran ({last[0]}..{last[-1]}): BF16 {mb:.4f}, FP8 {mf:.4f}, FP8 relative "
             f"difference **{100 * (mf - mb) / mb:+.3f}%** (paper: within 0.25%)", "",
             f"wall time per run (incl. start-up{', both at once on one device' if a.parallel else ''}): BF16 "
             f"{runs['BF16']['wall']:.0f} s, FP8 {runs['FP8']['wall']:.0f} s"
             + "".join(f"; {n} stopped at --time-limit after step {max(r['loss'] or [0])}" for n, r in runs.items()
                       if r["stopped"]), "",
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
