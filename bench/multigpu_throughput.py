"""Throughput per GPU with expert parallelism over all ranks, weak scaling: ours (BF16, FP8) beside megatron-core + TE.

    python bench/multigpu_throughput.py --gpus 8 --rounds 2 --out bench/throughput_x8.md     # 8 H200s
    python bench/multigpu_throughput.py --gpus 2 --cpu --smoke --out /tmp/t.md                # CPU check (gloo)

Per-GPU work: bench_stack.py's `stack` part, so a row here reads against that single-GPU table: 4 layers at
DeepSeek-V3 width (hidden 7168, 128 heads, MLA ranks 1536/512; 1 dense + 3 MoE layers, expert FFN 2048, 1 shared
expert, top-8 in 8 groups top-4) + embedding, output head and cross entropy, MTP off, micro-batch 1 x seq 4096 per
GPU, forward + backward (no optimizer). Weak scaling: 32 routed experts per GPU, so EP = DP = world size and
32 x world experts in all (8 GPUs: 256, DeepSeek-V3's count); every rank its own tokens. --smoke: the tiny preset
(8 experts per rank, 4 layers, float32, seq 32).

Implementations (`--impls`): ours (build_model, our dispatch), ours-fp8 (`--fp8 --fp8-backend native`: FP8Config
enabled, backend native), mcore-te / mcore-te-fp8 (megatron-core's GPTModel with TE's DeepSeek-V3 layers,
bench_stack.py's peer builders, alltoall dispatcher at the same EP; FP8 = TE's block-wise recipe); the TE rows are
skipped with a note where Transformer Engine does not import.

Hygiene as bench_stack.py: every (impl, round) is a fresh torchrun launch; the order of impls alternates per round;
per launch the median of --iters steps after --warmup (CUDA events on rank 0, all ranks in step by a barrier);
the table gives the median over rounds. Columns:
  tokens/s/GPU    micro-batch x seq / step time
  peak GiB        the largest torch.cuda.max_memory_allocated() over the ranks
  est GiB (err)   training/memory.py's estimate for the same layout (EP = DP = world, micro-batch 1) counting what
                  this run holds: weights + gradients at the parameter dtype (no DDP buffer, no optimizer) +
                  activations; err = (measured - estimate) / measured
  a2a ms          time in the expert all-to-alls of one step: the CUDA time of NCCL kernels in a torch.profiler
                  trace of one step (no other collective runs in forward+backward here; includes waiting for the
                  slowest rank), CPU time of the all-to-all ops on gloo; mean over ranks
  a2a MB          bytes handed to dist.all_to_all_single per rank in one step (forward + backward, counts included):
                  FP8 dispatch against BF16 (ours; the peer's are not counted the same way, left blank)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from multigpu_parity import header, torchrun_cmd, versions  # noqa: E402
from timing import time_steps  # noqa: E402

IMPLS = ("ours", "ours-fp8", "mcore-te", "mcore-te-fp8")
NAMES = {"ours": "ours BF16", "ours-fp8": "ours FP8 (native)", "mcore-te": "megatron-core + TE BF16",
         "mcore-te-fp8": "megatron-core + TE FP8 (block-wise)"}
EXPERTS_PER_GPU = {"full": 32, "smoke": 8}


def bench_cfg(smoke: bool, world: int, seq: int):
    from bench_stack import bench_config
    cfg = bench_config(smoke, 4)
    n = EXPERTS_PER_GPU["smoke" if smoke else "full"] * world
    return cfg.replace(seq_length=seq, moe={"num_experts": n}, parallel={"expert_model_parallel_size": world})


def estimate(cfg, world: int, seq: int) -> float:
    from megatron_dsv3.training.memory import estimate_memory
    pbytes = 2 if cfg.params_dtype in ("bfloat16", "float16") else 4
    e = estimate_memory(cfg, 1, world, seq_length=seq, grad_bytes=pbytes)
    return e["weights"] + e["gradients"] + e["activations"]


# ---- one launch (torchrun worker) ------------------------------------------------------------------------------
def child(a) -> None:
    import torch
    import torch.distributed as dist
    from megatron_dsv3.launch import init_parallel_state
    from megatron_dsv3.train import quiet_megatron
    quiet_megatron()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not a.cpu
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    init_parallel_state(ep=world, seed=1234)
    if not cuda:
        from megatron_dsv3.mcore_cpu import apply_cpu_shim
        apply_cpu_shim(force=True)
    cfg = bench_cfg(a.smoke, world, a.seq)
    fp8 = a.impl.endswith("-fp8")
    impl = a.impl[:-4] if fp8 else a.impl
    s = a.seq
    g = torch.Generator().manual_seed(1000 + rank)        # every rank its own tokens
    ids = torch.randint(0, cfg.vocab_size, (1, s), generator=g).to(dev)
    labels = torch.roll(ids, -1, dims=1)
    torch.manual_seed(0)
    if impl == "ours":
        from megatron_dsv3.model import build_model
        if fp8:
            cfg = cfg.replace(fp8={"enabled": True, "backend": "native"})
        model = build_model(cfg, device=dev, seed=0)
        loss_of = lambda: model(ids, labels=labels).float().mean()
    else:
        from bench_stack import peer_transformer_config
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        tc = peer_transformer_config(cfg, fp8)
        tc.expert_model_parallel_size = world
        tc.moe_token_dispatcher_type = "alltoall"
        model = GPTModel(tc, get_gpt_decoder_block_spec(tc, use_transformer_engine=True), cfg.vocab_size, s,
                         position_embedding_type="rope").to(dev)
        pos = torch.arange(s, device=dev).unsqueeze(0)
        loss_of = lambda: model(ids, pos, None, labels=labels).float().mean()
    model.train()

    # bytes through dist.all_to_all_single (our dispatch calls it through the module attribute)
    sent = {"bytes": 0, "calls": 0, "on": False}
    real = dist.all_to_all_single

    def counting(output, input, *args, **kw):
        if sent["on"]:
            sent["bytes"] += input.numel() * input.element_size()
            sent["calls"] += 1
        return real(output, input, *args, **kw)
    dist.all_to_all_single = counting

    def step():
        loss_of().backward()

    times = time_steps(step, a.warmup, a.iters, before_each=dist.barrier)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    # one profiled step: all-to-all time; and the bytes handed to all_to_all_single
    from torch.profiler import ProfilerActivity, profile
    dist.barrier()
    sent["on"] = True
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    sent["on"] = False
    a2a_us = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if cuda and "nccl" in name:
            a2a_us += getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        elif not cuda and ("all_to_all" in name or "alltoall" in name) and not name.startswith("c10d::"):
            a2a_us = max(a2a_us, e.cpu_time_total)   # the outermost op (nested records count the same time)
    mine = {"ms": statistics.median(times), "peak": peak, "a2a_ms": a2a_us / 1e3, "a2a_bytes": sent["bytes"],
            "a2a_calls": sent["calls"]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        from megatron_dsv3 import accounting as acc
        flops = s * acc.flops_per_token(cfg, s, include_mtp=False)
        ms = everyone[0]["ms"]
        out = {"ms": ms, "tok_s_gpu": s / (ms * 1e-3), "tflops": flops / (ms * 1e-3) / 1e12,
               "peak_gib": max(x["peak"] for x in everyone),
               "a2a_ms": statistics.mean(x["a2a_ms"] for x in everyone),
               "a2a_mb": statistics.mean(x["a2a_bytes"] for x in everyone) / 1e6,
               "a2a_calls": everyone[0]["a2a_calls"], "experts": cfg.moe.num_experts,
               "device": torch.cuda.get_device_name(0) if cuda else "CPU"}
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---- the driver -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="ranks = EP = DP (GPUs, or gloo CPU processes with --cpu)")
    p.add_argument("--cpu", action="store_true", help="gloo ranks on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny preset, float32, seq 32, 1 round, 1 + 2 steps")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=540, help="launches not started by then are skipped")
    p.add_argument("--launch-timeout", type=float, default=300, help="a launch running longer is killed")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    t_start = time.time()
    if a.gpus is None or a.gpus < 1:
        p.error(f"--gpus must be given and >= 1 (got {a.gpus})")
    impls = [x for x in a.impls.split(",") if x]
    for x in impls:
        if x not in IMPLS:
            p.error(f"--impls: unknown implementation {x!r} (known: {', '.join(IMPLS)})")
    for flag in ("rounds", "iters", "seq"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if a.smoke:
        a.seq, a.rounds, a.warmup, a.iters = 32, 1, 1, 2
    if not a.cpu:
        import torch
        if not torch.cuda.is_available():
            p.error("--gpus without --cpu needs CUDA (add --cpu for gloo ranks on CPU)")
        if torch.cuda.device_count() < a.gpus:
            p.error(f"--gpus {a.gpus}: only {torch.cuda.device_count()} GPU(s) here")
    vers = versions()
    notes = []
    if any(x.startswith("mcore-te") for x in impls) and vers["transformer-engine"] == "not installed":
        notes.append("Transformer Engine does not import here: the megatron-core + TE rows are skipped")
        impls = [x for x in impls if not x.startswith("mcore-te")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if a.cpu:
        env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    runs = {impl: [] for impl in impls}
    stopped = []                       # SIGTERM (a device call's `timeout`): stop and still write the table
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    for r in range(a.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            if time.time() - t_start > a.budget_s or stopped:
                runs[impl].append({"error": "skipped (budget)" if not stopped else "skipped (stopped by SIGTERM)"})
                continue
            args = ["--child", "--impl", impl, "--seq", str(a.seq), "--warmup", str(a.warmup), "--iters", str(a.iters)]
            args += (["--smoke"] if a.smoke else []) + (["--cpu"] if a.cpu else [])
            try:
                proc = subprocess.run(torchrun_cmd(a.gpus, os.path.abspath(__file__), args), capture_output=True,
                                      text=True, env=env, cwd=REPO, timeout=a.launch_timeout)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    errs = [l for l in (proc.stderr + proc.stdout).splitlines() if "Error" in l or "error" in l]
                    res = {"error": (errs or (proc.stderr.strip().splitlines() or ["?"]))[-1].strip()[:300]}
                    sys.stderr.write(proc.stderr[-3000:])
                else:
                    res = json.loads(line[0][7:])
            except subprocess.TimeoutExpired:
                res = {"error": f"launch timed out after {a.launch_timeout:.0f} s"}
            runs[impl].append(res)
            print(impl, r, "%.1f ms" % res["ms"] if "ms" in res else res["error"], flush=True)
    cfg = bench_cfg(a.smoke, a.gpus, a.seq)
    est = {impl: estimate(cfg.replace(fp8={"enabled": True}) if impl == "ours-fp8" else cfg, a.gpus, a.seq)
           for impl in impls}
    lines = header("Expert-parallel throughput per GPU, weak scaling", vers, a.gpus, a.cpu)
    what = ("tiny preset, 4 layers, float32, 8 experts per rank (smoke)" if a.smoke else
            "DeepSeek-V3 width, 4 layers (1 dense + 3 MoE), 32 routed experts per GPU top-8 (8 groups top-4) + 1 shared, bf16")
    lines += [f"- per GPU: {what}; micro-batch 1 x seq {a.seq}; forward + backward; EP = DP = {a.gpus} "
              f"({cfg.moe.num_experts} experts in all)",
              f"- {a.rounds} fresh launches per implementation, order alternating; each the median of {a.iters} steps "
              f"after {a.warmup} warm-up", *[f"- note: {n}" for n in notes], "",
              "| implementation | ms per round | median ms | tokens/s/GPU | model TFLOP/s/GPU | peak GiB | est GiB (err) "
              "| a2a ms | a2a MB/rank | vs mcore-te BF16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    med = {impl: statistics.median(x["ms"] for x in rs if "ms" in x) for impl, rs in runs.items()
           if any("ms" in x for x in rs)}
    for impl in impls:
        ok = [x for x in runs[impl] if "ms" in x]
        if not ok:
            lines.append(f"| {NAMES[impl]} | error: {runs[impl][-1].get('error')} | | | | | | | | |")
            continue
        m = med[impl]
        peak = max(x["peak_gib"] for x in ok)
        err = f"{est[impl]:.2f} ({100 * (peak - est[impl]) / peak:+.0f}%)" if peak else f"{est[impl]:.3f} (no CUDA)"
        mb = f"{statistics.median(x['a2a_mb'] for x in ok):.1f}" if impl.startswith("ours") else ""
        ratio = f"{med['mcore-te'] / m:.2f}x" if "mcore-te" in med and impl != "mcore-te" else ""
        lines.append(f"| {NAMES[impl]} | {', '.join('%.1f' % x['ms'] for x in ok)} | {m:.2f} | "
                     f"{statistics.median(x['tok_s_gpu'] for x in ok):,.0f} | {statistics.median(x['tflops'] for x in ok):.1f} | "
                     f"{peak:.2f} | {err} | {statistics.median(x['a2a_ms'] for x in ok):.2f} | {mb} | {ratio} |")
    if "ours" in med and "ours-fp8" in med:
        b = statistics.median(x["a2a_mb"] for x in runs["ours"] if "ms" in x)
        f8 = statistics.median(x["a2a_mb"] for x in runs["ours-fp8"] if "ms" in x)
        tb = statistics.median(x["a2a_ms"] for x in runs["ours"] if "ms" in x)
        tf = statistics.median(x["a2a_ms"] for x in runs["ours-fp8"] if "ms" in x)
        lines += ["", f"FP8 dispatch against BF16 (ours): {f8:.1f} / {b:.1f} MB per rank per step "
                      f"({f8 / b if b else float('nan'):.2f}x), all-to-all {tf:.2f} / {tb:.2f} ms"]
    lines += ["", "Not measured here: how much of the all-to-all DualPipe's overlap hides (needs PP >= 2: see the "
                  "pp*-dualpipe rows' ms/step in the parity table and bench_overlap.py)",
              f"total {time.time() - t_start:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if all(any("ms" in x for x in rs) for rs in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
