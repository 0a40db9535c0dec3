"""FP8 against BF16 training: the same model, data and seed, N steps each, loss curves side by side; with several
seeds, BF16 against BF16 of another seed too (the noise floor an FP8 difference is read against); and the
gradients of one global batch, parameter by parameter.

    python bench/fp8_accuracy.py --steps 300 --out bench/results_fp8_accuracy.md              # H200
    python bench/fp8_accuracy.py --steps 300 --seeds 1234,1235 --parallel --time-limit 500 --out F   # one device call
    python bench/fp8_accuracy.py --steps 300 --parallel --variant "FP8 experts BF16=--fp8-bf16-modules experts" \
        --variant "FP8 MLA BF16=--fp8-bf16-modules linear_q_down_proj,linear_q_up_proj,linear_kv_down_proj,..."
    python bench/fp8_accuracy.py --grads --out F        # one global batch: FP8 vs BF16 gradient per parameter
    python bench/fp8_accuracy.py --smoke [--grads]      # CPU: tiny preset

Each (precision, seed) is one `python -m megatron_dsv3.train` process (the built-in corpus, no download) writing
TensorBoard; the table gives the training loss every `--every` steps, the mean of the last 20 steps of each, and
FP8's relative difference (the paper: within 0.25% of BF16 on its 16B/230B runs). A small model trained a few
hundred steps on a small corpus is chaotic: runs that differ in the last bit drift apart, so the difference only
means something next to the spread of BF16 runs that differ by their seed alone (`--seeds a,b`), and, on a GPU,
by nothing at all: its BF16 training is not reproducible run to run (cuDNN's attention backward; on the H200 the
same seed ended 0.8% apart after 30 steps), which `--rerun` measures (BF16 once more per seed). `--variant
NAME=FLAGS` adds FP8 runs with more flags (an ablation: which modules' FP8 moves the loss).

--grads: each precision in its own process builds the trainer (its DDP, main_grad, micro-batch accumulation), runs
one global batch forward and backward, and keeps each parameter's gradient norm and its first 2^20 elements; the
table gives FP8's norm / BF16's and their cosine per parameter, and the lowest cosine per kind of parameter. The
routed experts' cosine is the lowest by nature: a token whose top-k choice FP8 flips moves its whole gradient from
one expert to another. So the routed experts are also compared expert by expert (whole gradients) beside the
tokens each run routed to each expert: experts that got the same tokens in both runs should agree as closely as
a dense linear does; a low cosine there is an FP8 error, not a routing flip.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP8_FLAGS = ["--fp8", "--fp8-backend", "native"]
RERUN = "BF16 again"
SLICE = 1 << 20                 # elements of each gradient kept for the cosine (its norm is of the whole tensor)


def losses(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _header(a, what: str) -> list:
    import torch
    now = datetime.datetime.now(datetime.timezone.utc)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return [f"# FP8 vs BF16 {what} ({now:%Y-%m-%d %H:%M} UTC, {dev}, torch {torch.__version__})", ""]


def _write(a, lines):
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)


# ---- one global batch: gradients per parameter ----------------------------------------------------------------------
def grads_child(out: str, flags: list) -> None:
    """In its own process: the trainer's first global batch, forward + backward, no optimizer step."""
    import torch
    from megatron_dsv3.train import quiet_megatron
    quiet_megatron()
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    t = Trainer(parse_args(flags))
    for c in t.chunks:
        c.train()
        c.zero_grad_buffer()
    t.optimizer.zero_grad()
    loss = t._reduce_loss(t._run(t.train_ds, 0, t.args.global_batch_size, forward_only=False))
    res = {"loss": loss, "norms": {}, "counts": {}}
    for c in t.chunks:
        for n, m in c.module.named_modules():
            if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor):     # routers: this batch's counts
                res["counts"][n.rsplit(".router", 1)[0]] = m.tokens_per_expert.tolist()
        for i, (n, p) in enumerate(c.module.named_parameters()):
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is None:
                continue
            g = g.detach().float().flatten()
            res["norms"][n] = g.norm().item()
            torch.save(g[:SLICE].cpu().clone(), os.path.join(out, f"{i}.pt"))
            res.setdefault("files", {})[n] = f"{i}.pt"
            if n.endswith(("experts.weight1", "experts.weight2")):                  # [E, ...]: whole, per expert
                torch.save(g.view(p.shape[0], -1).bfloat16().cpu(), os.path.join(out, f"{i}.experts.pt"))
    with open(os.path.join(out, "res.json"), "w") as fh:
        json.dump(res, fh)


def _kind(name: str) -> str:
    for k in ("experts.weight", "router", "shared_experts", "layernorm", "norm", "embedding", "output_layer",
              "self_attention", "mlp.linear", "eh_proj"):
        if k in name:
            return {"layernorm": "norm", "mlp.linear": "dense MLP", "experts.weight": "routed experts"}.get(k, k)
    return "other"


def run_grads(a, model_flags: list, tmp: str) -> list:
    import torch
    res = {}
    for name, extra in (("BF16", []), ("FP8", FP8_FLAGS)):
        d = os.path.join(tmp, name)
        os.makedirs(d, exist_ok=True)
        flags = model_flags + ["--train-iters", "1", "--seed", str(a.seeds[0]), "--no-progress-bar",
                               "--no-save-final"] + extra
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--grads-child", d] + flags, cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode:
            print((r.stdout + r.stderr)[-4000:])
            raise SystemExit(f"{name} gradient run failed (rc {r.returncode})")
        with open(os.path.join(d, "res.json")) as fh:
            res[name] = json.load(fh)
    b, f = res["BF16"], res["FP8"]
    rows, worst = [], {}
    for n, nb in b["norms"].items():
        gb = torch.load(os.path.join(tmp, "BF16", b["files"][n])).double()
        gf = torch.load(os.path.join(tmp, "FP8", f["files"][n])).double()
        cos = float(gb @ gf / (gb.norm() * gf.norm()).clamp_min(1e-300))
        ratio = f["norms"][n] / nb if nb else float("nan")
        rows.append(f"| `{n}` | {nb:.3e} | {ratio:.4f} | {cos:.5f} |")
        k = _kind(n)
        worst[k] = min(worst.get(k, (2.0, "")), (cos, n))
    lines = _header(a, "gradients, one global batch")
    experts = _per_expert(tmp, b, f)
    lines += [f"model: `{' '.join(model_flags)}`, seed {a.seeds[0]}, built-in corpus; FP8 = `{' '.join(FP8_FLAGS)}`",
              "", f"loss: BF16 {b['loss']:.6f}, FP8 {f['loss']:.6f} ({100 * (f['loss'] / b['loss'] - 1):+.3f}%)", "",
              "lowest cosine per kind of parameter: " + ", ".join(
                  f"{k} {c:.4f}" for k, (c, _) in sorted(worst.items(), key=lambda kv: kv[1])), "",
              f"| parameter | BF16 gradient norm | FP8 / BF16 norm | cosine (first {SLICE} elements) |",
              "|---|---|---|---|"] + rows
    if experts:
        lines += ["", "Routed experts, expert by expert (whole gradients, bf16 copies): cosine of FP8's and BF16's "
                  "gradient, split by whether the expert got the same number of tokens in both runs (a flip "
                  "changes the count unless two flips cancel)", "",
                  "| weight | experts same count / changed | cosine, same count: median, min | cosine, changed: "
                  "median, min | (token, expert) choices moved (half the summed abs count differences) of all |",
                  "|---|---|---|---|---|"] + experts
    return lines


def _per_expert(tmp: str, b: dict, f: dict) -> list:
    import torch
    rows = []
    for n in b["files"]:
        layer = n.rsplit(".experts.", 1)[0]
        if not n.endswith(("experts.weight1", "experts.weight2")) or layer not in b["counts"] \
                or layer not in f["counts"]:
            continue
        cb, cf = b["counts"][layer], f["counts"][layer]
        gb = torch.load(os.path.join(tmp, "BF16", b["files"][n].replace(".pt", ".experts.pt"))).double()
        gf = torch.load(os.path.join(tmp, "FP8", f["files"][n].replace(".pt", ".experts.pt"))).double()
        cos = (gb * gf).sum(1) / (gb.norm(dim=1) * gf.norm(dim=1)).clamp_min(1e-300)        # [E]
        same = [e for e in range(len(cb)) if cb[e] == cf[e] and cb[e] > 0]
        changed = [e for e in range(len(cb)) if cb[e] != cf[e] and cb[e] > 0]

        def stat(es):
            if not es:
                return "-"
            v = cos[es].sort().values
            return f"{float(v[len(es) // 2]):.4f}, {float(v[0]):.4f}"
        moved = sum(abs(x - y) for x, y in zip(cb, cf)) // 2
        rows.append(f"| `{n}` | {len(same)} / {len(changed)} | {stat(same)} | {stat(changed)} | {moved} of "
                    f"{sum(cb)} |")
    return rows


# ---- training curves --------------------------------------------------------------------------------------------------
RUN_OVERHEAD_GIB = 3.0       # per process beyond the estimate: CUDA context, NCCL, the caching allocator's slack


def _device_gib():
    """Memory of the device the runs share (GiB), None off CUDA (no packing there)."""
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if torch.cuda.is_available() else None


def _estimate(flags: list) -> float:
    from megatron_dsv3.training.memory import estimate_for_flags
    return estimate_for_flags(flags)


def _waves(variants: list, estimate, budget_gib) -> list:
    """variants [(name, seed, extra flags)] -> groups to run one after another, each fitting budget_gib by
    estimate(extra) + RUN_OVERHEAD_GIB per run (in order; a run that alone exceeds it runs alone). budget None: one
    group of all (no device memory to fit)."""
    if budget_gib is None:
        return [list(variants)]
    groups, cur, used = [], [], 0.0
    for v in variants:
        need = estimate(v[2]) + RUN_OVERHEAD_GIB
        if cur and used + need > budget_gib:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(v)
        used += need
    return groups + ([cur] if cur else [])


def run_training(a, model_flags: list, tmp: str) -> list:
    kinds = ([("BF16", []), ("FP8", FP8_FLAGS)] + [(n, FP8_FLAGS + f) for n, f in a.variant]
             + ([(RERUN, [])] if a.rerun else []))
    variants = [(f"{p} s{s}", s, extra) for s in a.seeds for p, extra in kinds]

    def command(name, seed, extra):
        return ([sys.executable, "-m", "megatron_dsv3.train"] + model_flags
                + ["--train-iters", str(a.steps), "--lr", "3e-4", "--lr-warmup-iters", str(max(1, a.steps // 10)),
                   "--seed", str(seed), "--log-interval", "1", "--tensorboard-dir", os.path.join(tmp, name),
                   "--no-progress-bar", "--no-save-final", "--eval-interval", str(10 * a.steps)] + extra)

    # --parallel: the runs at once on one device (their steps/s then share the GPU and are not speeds), in waves
    # that fit its memory by the trainer's estimate; --time-limit: stop them there and report the steps reached.
    device_gib = _device_gib() if a.parallel else None
    groups = _waves(variants, lambda extra: _estimate(model_flags + extra), device_gib) if a.parallel \
        else [(v,) for v in variants]
    if len(groups) > 1 and a.parallel:
        print(f"--parallel: {len(variants)} runs in {len(groups)} waves of at most {max(map(len, groups))} (the "
              f"memory estimate of each run against the device's {device_gib:.0f} GiB)", flush=True)
    runs, failed = {}, {}
    t_start = time.perf_counter()
    for group in groups:
        procs = {}
        for name, seed, extra in group:
            log = open(os.path.join(tmp, name.replace(" ", "_") + ".log"), "w+")
            procs[name] = (subprocess.Popen(command(name.replace(" ", "_"), seed, extra), cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, text=True), log, time.perf_counter())
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
                # the other runs are reported all the same (one failure is not a reason to lose their device time)
                print(out[-4000:])
                print(f"{name} run failed (rc {rc})", flush=True)
                failed[name] = rc
                continue
            runs[name] = {"loss": losses(os.path.join(tmp, name.replace(" ", "_"))), "wall": wall, "stopped": rc != 0}
            print(name, f"{wall:.0f} s", "(stopped at --time-limit)" if rc else "", flush=True)
    if not runs:
        raise SystemExit("every run failed: " + ", ".join(f"{n} (rc {rc})" for n, rc in failed.items()))
    common = sorted(set.intersection(*(set(r["loss"]) for r in runs.values())))
    if not common:
        raise SystemExit("no step logged by every run")
    a.failed = failed
    last = common[-20:]
    mean = {n: sum(r["loss"][s] for s in last) / len(last) for n, r in runs.items()}

    def rel(x, y):
        return f"{100 * (mean[x] - mean[y]) / mean[y]:+.3f}%" if x in mean and y in mean else "n/a (a run failed)"

    s0 = a.seeds[0]
    lines = _header(a, "training")
    lines += [f"model: `{' '.join(model_flags)}`, {a.steps} steps, lr 3e-4 (warmup {max(1, a.steps // 10)}), "
              f"seeds {', '.join(map(str, a.seeds))}, built-in corpus; FP8 = `{' '.join(FP8_FLAGS)}`"
              + "".join(f"; {n} = FP8 `{' '.join(f)}`" for n, f in a.variant), "",
              f"mean training loss of the last {len(last)} steps every run reached ({last[0]}..{last[-1]}): "
              + ", ".join(f"{n} {m:.4f}" for n, m in mean.items()), ""]
    for s in a.seeds:
        lines.append(f"- seed {s}: FP8 relative to BF16 **{rel(f'FP8 s{s}', f'BF16 s{s}')}** (paper: within "
                     f"0.25%)" + "".join(f"; {n} {rel(f'{n} s{s}', f'BF16 s{s}')}" for n, _ in a.variant))
    if a.rerun:
        for s in a.seeds:
            lines.append(f"- run to run (seed {s} and every flag the same): {RERUN} relative to BF16 "
                         f"{rel(f'{RERUN} s{s}', f'BF16 s{s}')}")
    for s in a.seeds[1:]:
        lines.append(f"- noise floor: BF16 seed {s} relative to BF16 seed {s0} {rel(f'BF16 s{s}', f'BF16 s{s0}')}"
                     f" (FP8 seed {s} relative to FP8 seed {s0}: {rel(f'FP8 s{s}', f'FP8 s{s0}')})")
    lines += ["", f"wall time per run (incl. start-up{', all at once on one device' if a.parallel else ''}): "
              + ", ".join(f"{n} {r['wall']:.0f} s" for n, r in runs.items())
              + "".join(f"; {n} stopped at --time-limit after step {max(r['loss'] or [0])}"
                        for n, r in runs.items() if r["stopped"])
              + "".join(f"; {n} FAILED (rc {rc})" for n, rc in failed.items()), "",
              "| step | " + " | ".join(f"{n} loss" for n in runs) + " | "
              + " | ".join(f"FP8 vs BF16 s{s}" for s in a.seeds) + " |",
              "|---|" + "---|" * (len(runs) + len(a.seeds))]
    for st in common:
        if st % a.every == 0 or st == common[-1]:
            diffs = [f"{100 * (runs[f'FP8 s{s}']['loss'][st] / runs[f'BF16 s{s}']['loss'][st] - 1):+.2f}%"
                     if f"FP8 s{s}" in runs and f"BF16 s{s}" in runs else "n/a" for s in a.seeds]
            lines.append(f"| {st} | " + " | ".join(f"{r['loss'][st]:.4f}" for r in runs.values()) + " | "
                         + " | ".join(diffs) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="fp8_accuracy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seeds", default="1234", help="comma list: BF16 and FP8 run once per seed")
    p.add_argument("--model", default="--preset proxy-1gpu --num-layers 4 --seq-length 1024 --mtp-num-layers 1",
                   help="model flags of megatron_dsv3.train")
    p.add_argument("--batch", default="--micro-batch-size 4 --global-batch-size 16")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="an FP8 run with more megatron_dsv3.train flags, per seed (repeatable)")
    p.add_argument("--rerun", action="store_true", help="BF16 once more per seed, the same flags: the run-to-run "
                   "spread (on a GPU, not zero)")
    p.add_argument("--grads", action="store_true", help="one global batch: FP8 vs BF16 gradients per parameter")
    p.add_argument("--parallel", action="store_true", help="run the training runs at once on one device, in "
                   "waves that fit its memory by the trainer's estimate")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop the runs there, report what ran")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes integers separated by commas, got {a.seeds!r}")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds needs one or more different seeds, got {a.seeds}")
    variants = []
    for v in a.variant:
        name, eq, flags = v.partition("=")
        if not eq or not name.strip() or name.strip() in ("BF16", "FP8", RERUN):
            p.error(f"--variant takes NAME=FLAGS with a new name, got {v!r}")
        variants.append((name.strip(), flags.split()))
    a.variant = variants
    if a.grads and (a.rerun or a.variant):
        p.error("--grads compares one batch's gradients of BF16 and FP8; --rerun and --variant are for training runs")
    if a.smoke:
        a.steps, a.every, a.model, a.batch = 6, 2, "--preset tiny --cpu", "--micro-batch-size 2 --global-batch-size 4"
    model_flags = a.model.split() + a.batch.split()
    with tempfile.TemporaryDirectory() as tmp:
        lines = run_grads(a, model_flags, tmp) if a.grads else run_training(a, model_flags, tmp)
    _write(a, lines)
    if getattr(a, "failed", None):
        raise SystemExit("failed: " + ", ".join(f"{n} (rc {rc})" for n, rc in a.failed.items())
                         + " (the table has the other runs)")
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--grads-child":
        sys.path.insert(0, REPO)
        grads_child(sys.argv[2], sys.argv[3:])
    else:
        main()
