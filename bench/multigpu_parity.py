"""Parity of the trainer over several ranks against one rank, in one command: losses, expert bias, resume.

    python bench/multigpu_parity.py --gpus 8 --out bench/parity_x8.md          # 8 GPUs (NCCL), 20 steps
    python bench/multigpu_parity.py --gpus 2 --cpu --smoke --out /tmp/p.md     # CPU check: 2 gloo ranks, tiny sizes

What runs. Two torchrun launches of this file's `--worker`: the single-rank reference (world size 1), then every
layout at world size --gpus (data parallelism fills the ranks a layout leaves). Each launch runs its jobs one after
another in the same processes (parallel_state torn down and rebuilt between them), so one launch costs one start-up.
Runs (`--runs`): tiny in BF16 and FP32, proxy-1gpu in BF16, each at 8 layers (PP = 4 with DualPipeV / interleaved
needs 8 stages), micro-batch 1, global batch 16 (divisible by every DP size up to 8; >= 2 x PP micro-batches per
pipeline for DualPipe(V) on 8 GPUs), sequence 128 (tiny) / 1024 (proxy-1gpu), LR 1e-3 after 2 warm-up steps,
bias update rate 0.01 (so the bias moves every step). Every run starts from --seed's initialisation, which
build_model makes the same under every layout.

Layouts: dp (EP 1), ep2 / ep4 / ep8, tp2-sp (TP 2 + sequence parallelism), pp2 / pp4 with 1f1b, interleaved (2 virtual
stages per rank), dualpipe, dualpipev, and tp2-sp-pp2-ep2. One that does not fit --gpus is listed as "needs N GPUs".

Checks per (run, layout):
  * loss: every step's global-batch loss against the single rank's, relative difference; ok within the
    tolerance of the dtype (TOLERANCE below: a tight one for the first 3 steps, where a missing gradient reduction
    shows as ~1e-3 in FP32, and a looser one over all steps, where Adam turns rounding noise into +-lr steps);
  * bias: after every step, the expert bias of each MoE layer is bit-identical on every rank that holds that layer
    (the bias is also compared with the single rank's: the table gives the layers that differ, FP32 should have none);
  * resume: the run saves a checkpoint at step N/2; the NEXT layout in the list loads it and runs 2 steps, whose
    losses must match the saving run's steps N/2+1, N/2+2 within the first-steps tolerance (`--resume-runs`; the
    last layout's checkpoint is resumed by the first layout). Checkpoints are deleted once resumed.
A failed job (an exception, or no progress for --job-timeout s) becomes a row with its error; the launch is restarted
for the jobs left. Jobs not started within --budget-s are listed as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

# (flags, tp, pp, ep) per layout; DP = world / (tp x pp)
LAYOUTS = {
    "dp": ([], 1, 1, 1),
    "ep2": (["--expert-model-parallel-size", "2"], 1, 1, 2),
    "ep4": (["--expert-model-parallel-size", "4"], 1, 1, 4),
    "ep8": (["--expert-model-parallel-size", "8"], 1, 1, 8),
    "tp2-sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2, 1, 1),
    "tp2-sp-pp2-ep2": (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size",
                        "2", "--expert-model-parallel-size", "2"], 2, 2, 2),
}
for _pp in (2, 4):
    for _s in ("1f1b", "interleaved", "dualpipe", "dualpipev"):
        _f = ["--pipeline-model-parallel-size", str(_pp), "--pipeline-schedule", _s]
        if _s == "interleaved":
            _f += ["--num-virtual-stages-per-pipeline-rank", "2"]
        LAYOUTS[f"pp{_pp}-{_s}"] = (_f, 1, _pp, 1)

# relative loss difference allowed: (first 3 steps, all steps). FP32: test_parallel.py's 5e-5 over 3 steps (measured
# ~1e-5 for TP), 1e-3 over 20. BF16: rounding of bf16 weights/activations summed in another order, ~4e-3 per
# element; the losses are means over 16 x seq tokens: 1e-2 early, 3e-2 over 20 steps (first guesses, to be revised
# with the measured columns of the first GPU run)
TOLERANCE = {"fp32": (5e-5, 1e-3), "bf16": (1e-2, 3e-2)}
EARLY = 3
# per preset: layers, sequence length; the rest of the model is the preset's
RUN_SHAPES = {"tiny": (8, 128), "proxy-1gpu": (8, 1024)}
SMOKE_SHAPE = (4, 32)


def fits(layout: str, world: int) -> bool:
    _, tp, pp, ep = LAYOUTS[layout]
    return world % (tp * pp) == 0 and ((world // (tp * pp)) * tp) % ep == 0


def needs(layout: str) -> int:
    return next(w for w in (1, 2, 4, 8, 16, 32) if fits(layout, w))


# ---- shared with multigpu_throughput.py ---------------------------------------------------------------------------
def torchrun_cmd(nproc: int, script: str, args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def versions() -> dict:
    from bench_stack import _versions
    out = _versions()
    code = ("import torch; c = torch.cuda.is_available(); print(torch.__version__, '|', torch.cuda.get_device_name(0) "
            "if c else 'CPU', '|', torch.cuda.device_count() if c else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    parts = [x.strip() for x in r.stdout.split("|")] if r.returncode == 0 else ["?", "?", "0"]
    out.update(torch=parts[0], device=parts[1], n_devices=int(parts[2]))
    return out


def header(title: str, vers: dict, world: int, cpu: bool) -> list:
    now = datetime.datetime.now(datetime.timezone.utc)
    where = f"{world} gloo CPU ranks" if cpu else f"{world} x {vers['device']} (NCCL)"
    return [f"# {title} ({now:%Y-%m-%d %H:%M} UTC)", "",
            f"- {where}; torch {vers['torch']}; megatron-core {vers['megatron-core']}; transformer-engine "
            f"{vers['transformer-engine']}; commit {vers['commit']}"]


# SIGTERM (the `timeout` of a device call) stops the runs and still writes the table of what finished
_STOPPED = []


def _stop(signum, frame):
    _STOPPED.append(signum)


def run_launch(cmd, env, done, expected, job_timeout, deadline, log):
    """Run one launch; kill it when no job finishes for `job_timeout` s, at `deadline` (time.time()) or on SIGTERM.
    Returns the exit code (None when killed). `done()` counts the finished jobs; `expected` is the number the launch
    should finish."""
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        last, t_last = done(), time.monotonic()
        while p.poll() is None:
            time.sleep(0.5)
            n = done()
            if n != last:
                last, t_last = n, time.monotonic()
            if time.monotonic() - t_last > job_timeout or time.time() > deadline or _STOPPED:
                os.killpg(p.pid, signal.SIGKILL)        # torchrun and its ranks: the session this call started
                p.wait()
                f.write(f"\n[killed: no job finished for {job_timeout:.0f} s, past the budget or stopped]\n")
                return None
        return p.returncode


# ---- the worker (one per rank, under torchrun) ----------------------------------------------------------------------
def _digest(t) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _run_job(job, rank):
    import torch
    from megatron_dsv3.moe.router import routers_of
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    t0 = time.perf_counter()
    t = Trainer(parse_args(job["argv"]))
    build_s = time.perf_counter() - t0
    routers = routers_of([c.module for c in t.chunks])
    out = {"loss": [], "bias_digest": [], "step_s": [], "build_s": build_s}
    for step in range(job["steps"]):
        s0 = time.perf_counter()
        rec = t.train_step()
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        out["step_s"].append(time.perf_counter() - s0)
        out["loss"].append(rec["loss"])
        out["bias_digest"].append({str(r.layer_number): _digest(r.expert_bias) for _, r in routers})
        if job.get("save_at") == t.iteration:
            t.save()
    out["bias_final"] = {str(r.layer_number): r.expert_bias.detach().float().cpu().tolist() for _, r in routers}
    out["iterations"] = [h["iteration"] for h in t.history]
    if t.device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    out["wall_s"] = time.perf_counter() - t0
    del t
    return out


def worker(a) -> None:
    import gc
    import torch
    import torch.distributed as dist
    from megatron_dsv3.train import quiet_megatron
    quiet_megatron()
    with open(a.plan) as f:
        plan = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not a.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank == 0 and not os.path.exists(plan["data_prefix"] + ".bin"):
        _make_data(plan["data_dir"])
    dist.barrier()
    from megatron.core import parallel_state as ps
    for job in plan["jobs"]:
        go = [time.time() < plan["deadline"]]
        dist.broadcast_object_list(go, src=0)          # every rank takes the same decision
        path = os.path.join(plan["results"], f"{job['key']}.rank{rank}.json")
        if not go[0]:
            break
        try:
            res = _run_job(job, rank)
        except Exception as e:   # recorded; the next job runs (a rank stuck in a collective is killed by the driver)
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        finally:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(path + ".tmp", path)
        dist.barrier()
        if rank == 0:
            for d in job.get("delete_after", []):
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


WORDS = ("the a model expert token layer router bias loss batch step gradient pipeline tensor data parallel "
         "attention latent query key value rope scale group node balance update sequence memory weight").split()


def _make_data(d: str, n_docs: int = 1000) -> str:
    """A byte-tokenized indexed dataset of ~300K tokens (no download, no corpus walk)."""
    import random
    from megatron_dsv3.training.preprocess import preprocess
    from megatron_dsv3.training.tokenizer import ByteTokenizer
    rng = random.Random(0)
    os.makedirs(d, exist_ok=True)
    jsonl = os.path.join(d, "corpus.jsonl")
    with open(jsonl, "w") as f:
        for _ in range(n_docs):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))]
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")
    return preprocess([jsonl], os.path.join(d, "corpus"), ByteTokenizer(), workers=1, progress=False)["prefix"]


# ---- the driver ---------------------------------------------------------------------------------------------------
def trainer_argv(run: str, a, data_prefix: str, cache: str) -> list:
    preset, dtype = run.split(":")
    layers, seq = SMOKE_SHAPE if a.smoke else RUN_SHAPES.get(preset, RUN_SHAPES["proxy-1gpu"])
    argv = ["--preset", preset, "--num-layers", str(layers), "--seq-length", str(seq), "--micro-batch-size", "1",
            "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.steps), "--lr", "1e-3",
            "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--eval-interval", "0", "--eval-iters", "0",
            "--log-interval", "100000", "--generate-tokens", "0", "--no-progress-bar", "--bias-update-rate", "0.01",
            "--data-path", data_prefix, "--data-cache-path", cache, "--seed", "1234",
            "--bf16" if dtype == "bf16" else "--fp32", "--distributed-timeout-minutes", "5"]
    return argv + (["--cpu"] if a.cpu else []) + a.extra.split()


def plan_jobs(a, runs, layouts, data_prefix, cache, ckdir):
    """(reference jobs, layout jobs) in run order; each layout job saves at N/2 when its run is resumed, and the
    next layout's resume job loads it."""
    ref, par = [], []
    k = a.steps // 2
    for run in runs:
        base = trainer_argv(run, a, data_prefix, cache)
        ref.append({"key": f"{run}|ref", "argv": base, "steps": a.steps})
        resume = run.split(":")[0] in a.resume_runs.split(",") and k >= 1 and a.steps - k >= 1
        jobs = []
        for i, lay in enumerate(layouts):
            ck = os.path.join(ckdir, f"{run.replace(':', '_')}_{lay}")
            job = {"key": f"{run}|{lay}", "argv": base + LAYOUTS[lay][0] + (["--save", ck] if resume else []),
                   "steps": a.steps, "run": run, "layout": lay}
            if resume:
                job["save_at"] = k
            jobs.append(job)
        out = []
        for i, job in enumerate(jobs):
            out.append(job)
            if resume and i > 0:        # layout i resumes layout i-1's checkpoint
                out.append(_resume_job(jobs[i - 1], job, base, k, a.steps))
        if resume:                      # the first layout resumes the last one's
            out.append(_resume_job(jobs[-1], jobs[0], base, k, a.steps))
        par += out
    return ref, par


def _resume_job(src, dst, base, k, n):
    ck = src["argv"][src["argv"].index("--save") + 1]
    argv = list(base)
    for flag in ("--preset", "--num-layers"):     # the model comes from the checkpoint
        i = argv.index(flag)
        del argv[i:i + 2]
    argv += LAYOUTS[dst["layout"]][0] + ["--load", ck]
    return {"key": f"{src['key']}|resume", "argv": argv, "steps": min(2, n - k), "resumes": src["key"],
            "under": dst["layout"], "delete_after": [ck]}


def execute(jobs, world, a, workdir, results, deadline, tag):
    """Run `jobs` in as few launches as failures allow. Returns {key: [per-rank result] or {"error"}}."""
    out = {}
    left = list(jobs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if a.cpu else "4"))
    if a.cpu:
        env["TORCHDYNAMO_DISABLE"] = "1"
    log = os.path.join(workdir, f"{tag}.log")

    def files(key):
        return sorted(glob.glob(os.path.join(results, glob.escape(key) + ".rank*.json")))

    while left and time.time() < deadline and not _STOPPED:
        plan = os.path.join(workdir, f"{tag}-plan.json")
        with open(plan, "w") as f:
            json.dump({"jobs": left, "deadline": deadline, "results": results, "data_dir": a.data_dir,
                       "data_prefix": a.data_prefix}, f)
        cmd = torchrun_cmd(world, os.path.abspath(__file__), ["--worker", "--plan", plan] + (["--cpu"] if a.cpu else []))
        rc = run_launch(cmd, env, lambda: sum(len(files(j["key"])) == world for j in left), len(left),
                        a.job_timeout, deadline + 60, log)
        progressed = False
        still = []
        for j in left:
            fs = files(j["key"])
            if len(fs) == world:
                rs = []
                for p in fs:
                    with open(p) as f:
                        rs.append(json.load(f))
                out[j["key"]] = rs
                progressed = True
            else:
                still.append(j)
        if not still:
            break
        if time.time() >= deadline or _STOPPED:
            break
        # the first unfinished job is the one the launch died in (or the launch failed to start)
        bad = still[0]
        tail = _log_tail(log)
        out[bad["key"]] = {"error": ("no progress for %d s" % a.job_timeout if rc is None else f"launch exit {rc}")
                           + (f": {tail}" if tail else "")}
        print(f"[{tag}] {bad['key']}: {out[bad['key']]['error']}", flush=True)
        left = [j for j in still[1:] if j.get("resumes") != bad["key"]]
        if not progressed and rc not in (None, 0) and bad is jobs[0]:
            break                                           # the launch itself fails: nothing will run
    return out


def _log_tail(log: str) -> str:
    try:
        with open(log) as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return ""
    errs = [l for l in lines if "Error" in l or "error:" in l]
    return (errs[-1] if errs else (lines[-1] if lines else ""))[:200]


def _one(res):
    """Rank results -> (error or None, the last rank's result)."""
    if isinstance(res, dict):
        return res.get("error", "?"), None
    errs = [r["error"] for r in res if "error" in r]
    return (errs[0] if errs else None), res[-1]


def compare(run, layout, ref, got, resume_job, resume_res, steps):
    """One table row as a dict."""
    dtype = run.split(":")[1]
    early_tol, all_tol = TOLERANCE[dtype]
    row = {"run": run, "layout": layout, "steps": "", "loss": "", "bias": "", "resume": "", "wall": "",
           "status": "error", "notes": ""}
    err, last = _one(got)
    if err:
        row["notes"] = err
        return row
    ref_err, ref_last = _one(ref) if ref is not None else ("no reference", None)
    row["steps"] = len(last["loss"])
    row["wall"] = f"{last['wall_s']:.1f} ({1e3 * sorted(last['step_s'])[len(last['step_s']) // 2]:.0f} ms/step)"
    ok = True
    if ref_err:
        row["loss"], ok = f"reference failed: {ref_err}", False
    else:
        rl = ref_last["loss"]
        diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(last["loss"], rl)]
        early, whole = max(diffs[:EARLY], default=0.0), max(diffs, default=0.0)
        loss_ok = early <= early_tol and whole <= all_tol and len(diffs) == len(rl)
        # every rank reports the same global-batch loss
        same = all(r["loss"] == last["loss"] for r in got)
        row["loss"] = f"{early:.1e} / {whole:.1e}" + ("" if same else " (ranks disagree)")
        ok &= loss_ok and same
        if not loss_ok:
            first = next((i + 1 for i, d in enumerate(diffs) if d > early_tol), None)
            row["notes"] += (f"loss over tolerance {early_tol:g} / {all_tol:g} (first step over {early_tol:g}: "
                             f"{first}; diffs by step: {' '.join('%.0e' % d for d in diffs)}); ")
    # bias: bit-identical on every rank holding the layer, after every step
    diff_steps = set()
    for s in range(len(last["bias_digest"])):
        seen = {}
        for r in got:
            for layer, dg in r["bias_digest"][s].items():
                if seen.setdefault(layer, dg) != dg:
                    diff_steps.add(s + 1)
    bias_ok = not diff_steps
    row["bias"] = "yes" if bias_ok else f"NO (steps {sorted(diff_steps)[:5]})"
    ok &= bias_ok
    if not ref_err:
        final = {}
        for r in got:
            final.update(r["bias_final"])
        off = [l for l, b in final.items() if b != ref_last["bias_final"].get(l)]
        if off:
            row["notes"] += f"final bias != 1 rank in layers {','.join(sorted(off, key=int))}; "
    if resume_job is None:
        row["resume"] = "not run"
    else:
        rerr, rlast = _one(resume_res) if resume_res is not None else ("not run (budget)", None)
        if resume_res is None:          # the budget ended before the next layout ran: nothing was checked
            row["resume"] = f"not run (budget; under {resume_job['under']})"
        elif rerr:
            row["resume"], ok = f"error ({resume_job['under']}): {rerr}", False
        else:
            k = steps // 2
            want = last["loss"][k:k + len(rlast["loss"])]
            rd = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(rlast["loss"], want)), default=float("inf"))
            good = rd <= early_tol and rlast["iterations"][0] == k + 1
            row["resume"] = f"{'ok' if good else 'FAILED'} under {resume_job['under']} ({rd:.1e})"
            ok &= good
    row["status"] = "ok" if ok else "FAILED"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="ranks (GPUs, or gloo CPU processes with --cpu)")
    p.add_argument("--cpu", action="store_true", help="gloo ranks on CPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for a CPU check: tiny:fp32, 4 layers, seq 32, global batch 4, 3 steps")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 20; 3 with --smoke)")
    p.add_argument("--runs", default=None, help="comma list of preset:dtype (default tiny:bf16,tiny:fp32,"
                                                 "proxy-1gpu:bf16; tiny:fp32 with --smoke)")
    p.add_argument("--layouts", default=None, help=f"comma list of {', '.join(LAYOUTS)} (default: all)")
    p.add_argument("--resume-runs", default="tiny", help="presets whose layouts also check save -> resume under the "
                   "next layout (comma list; '' for none; proxy-1gpu's checkpoints are ~30 GB each)")
    p.add_argument("--global-batch-size", type=int, default=None, help="default 16 (4 with --smoke)")
    p.add_argument("--budget-s", type=float, default=540, help="jobs not started by then are skipped (default 540)")
    p.add_argument("--job-timeout", type=float, default=300, help="a launch with no job finished for this long is "
                   "killed and restarted for the jobs left (default 300)")
    p.add_argument("--workdir", default=None, help="checkpoints, logs, per-rank results (default: a temp dir)")
    p.add_argument("--extra", default="", help="trainer flags appended to every run, e.g. '--bias-update-rate 0:0' "
                                                "(later flags win over the defaults above)")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    t_start = time.time()
    if a.gpus is None:
        p.error("--gpus is required (the number of ranks)")
    if a.gpus < 1:
        p.error(f"--gpus must be >= 1, got {a.gpus}")
    a.steps = a.steps if a.steps is not None else (3 if a.smoke else 20)
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    a.global_batch_size = a.global_batch_size or (4 if a.smoke else 16)
    if a.global_batch_size < 1:
        p.error(f"--global-batch-size must be >= 1, got {a.global_batch_size}")
    runs = [x for x in (a.runs or ("tiny:fp32" if a.smoke else "tiny:bf16,tiny:fp32,proxy-1gpu:bf16")).split(",") if x]
    for r in runs:
        if r.count(":") != 1 or r.split(":")[1] not in TOLERANCE:
            p.error(f"--runs: {r!r} is not preset:dtype with dtype bf16 or fp32")
        from megatron_dsv3.config import PRESETS
        if r.split(":")[0] not in PRESETS:
            p.error(f"--runs: unknown preset {r.split(':')[0]!r} (known: {', '.join(sorted(PRESETS))})")
    layouts = [x for x in (a.layouts or ",".join(LAYOUTS)).split(",") if x]
    for x in layouts:
        if x not in LAYOUTS:
            p.error(f"--layouts: unknown layout {x!r} (known: {', '.join(LAYOUTS)})")
    if not a.cpu:
        import torch
        if not torch.cuda.is_available():
            p.error("--gpus without --cpu needs CUDA (add --cpu for gloo ranks on CPU)")
        if torch.cuda.device_count() < a.gpus:
            p.error(f"--gpus {a.gpus}: only {torch.cuda.device_count()} GPU(s) here")
    run_layouts = [x for x in layouts if fits(x, a.gpus)]
    workdir = a.workdir or tempfile.mkdtemp(prefix="dsv3-parity-")
    os.makedirs(workdir, exist_ok=True)
    results = os.path.join(workdir, "results")
    shutil.rmtree(results, ignore_errors=True)
    os.makedirs(results)
    a.data_dir = os.path.join(workdir, "data")
    a.data_prefix = os.path.join(a.data_dir, "corpus_text_document")
    cache = os.path.join(workdir, "cache")
    ckdir = os.path.join(workdir, "ckpt")
    shutil.rmtree(ckdir, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    deadline = t_start + a.budget_s
    signal.signal(signal.SIGTERM, _stop)
    ref_jobs, par_jobs = plan_jobs(a, runs, run_layouts, a.data_prefix, cache, ckdir)
    print(f"work directory {workdir}; {len(ref_jobs)} reference and {len(par_jobs)} layout jobs on {a.gpus} ranks",
          flush=True)
    ref = execute(ref_jobs, 1, a, workdir, results, deadline, "reference")
    got = execute(par_jobs, a.gpus, a, workdir, results, deadline, "layouts") if run_layouts else {}
    shutil.rmtree(ckdir, ignore_errors=True)

    rows = []
    resume_of = {j["resumes"]: j for j in par_jobs if "resumes" in j}
    for run in runs:
        for lay in layouts:
            key = f"{run}|{lay}"
            if not fits(lay, a.gpus):
                rows.append({"run": run, "layout": lay, "status": f"needs {needs(lay)} GPUs"})
            elif key not in got:
                rows.append({"run": run, "layout": lay, "status": "skipped (budget)"})
            else:
                rj = resume_of.get(key)
                rows.append(compare(run, lay, ref.get(f"{run}|ref"), got[key], rj,
                                    got.get(rj["key"]) if rj else None, a.steps))
    vers = versions()
    lines = header("Multi-rank parity of the trainer against one rank", vers, a.gpus, a.cpu)
    shapes = {r: (SMOKE_SHAPE if a.smoke else RUN_SHAPES.get(r.split(':')[0], RUN_SHAPES['proxy-1gpu'])) for r in runs}
    lines += [f"- runs: " + "; ".join(f"{r} ({l} layers, seq {s})" for r, (l, s) in shapes.items()) +
              f"; micro-batch 1, global batch {a.global_batch_size}, {a.steps} steps, LR 1e-3, bias rate 0.01",
              "- loss diff: max relative difference to the single rank over the first 3 steps / all steps; tolerance "
              + ", ".join(f"{d} {e:g} / {w:g}" for d, (e, w) in TOLERANCE.items()),
              "- bias equal: every MoE layer's expert bias bit-identical on all ranks holding it, after every step",
              f"- resume: checkpoint saved at step {a.steps // 2}, loaded by the layout named, 2 steps against the "
              f"saving run (first-steps tolerance)",
              f"- wall: build + {a.steps} steps in s, and the median step", "",
              "| run | layout | steps | max loss diff (3 / all) | bias equal | resume | wall s | status | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['layout']} | {r.get('steps', '')} | {r.get('loss', '')} | {r.get('bias', '')} "
                     f"| {r.get('resume', '')} | {r.get('wall', '')} | {r['status']} | {r.get('notes', '')} |")
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_bad = sum(r["status"] in ("FAILED", "error") for r in rows)
    lines += ["", f"{n_ok} ok, {n_bad} failed, {len(rows) - n_ok - n_bad} not run; total {time.time() - t_start:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
