"""DeepSeekMoE alone, forward+backward, one variant per process, alternating, median of repeats.

    python bench/bench_moe.py --rounds 3 --out bench/results_moe.md                  # ours (this tree)
    python bench/bench_moe.py --src A=/path/to/old/tree --src B=. --rounds 3         # two source trees side by side

Sizes default to DeepSeek-V3's width at one GPU (the GPU fast-path issue's table): hidden 7168, 32 routed experts top-8
in 8 groups top-4, 1 shared expert, expert FFN 2048, micro-batch 1 x seq 4096, bf16. Each (variant, round) runs in a
fresh `python bench/bench_moe.py --child ...` process (in one process the same code measured differently depending on
what ran before it) and reports: median ms of `--iters` timed steps (CUDA events) after `--warmup`, peak GiB, and the
memory the forward keeps for backward (allocated after forward minus before). Model FLOPs: 3 x (router + top-k
experts + shared expert matmuls); "of 779" is against the measured bf16 matmul rate of the H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

MATMUL_TFLOPS = 779.0


def child(a) -> dict:
    sys.path.insert(0, os.path.abspath(a.child))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import time_steps
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    import torch.distributed as dist
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.testing import single_process
    from megatron_dsv3.specs import get_moe_spec
    from megatron.core.transformer.spec_utils import build_module

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    cfg = DSV3Config.from_preset("dsv3-671b").replace(
        num_layers=4, params_dtype="bfloat16" if cuda else "float32",
        moe=dict(num_experts=a.experts, n_group=8, topk_group=4, top_k=8, first_k_dense_replace=0,
                 expert_ffn_hidden_size=a.ffn), hidden_size=a.hidden)
    with single_process(backend="nccl" if cuda else "gloo"):
        torch.manual_seed(0)
        if a.impl == "ours":
            layer = build_module(get_moe_spec(cfg), config=cfg.to_transformer_config()).to(dev)
        else:   # megatron-core's own MoELayer at the same sizes (bench_layers.py builds it as its GPT spec does)
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_layers import build_mcore_moe_layer
            from megatron.core.process_groups_config import ProcessGroupCollection
            spec = a.impl.split("-", 1)[1]                 # mcore-local | mcore-te
            # grouped GEMM: TE's (the local spec's GroupedMLP needs the separate grouped_gemm package)
            layer = build_mcore_moe_layer(cfg, spec == "te", ProcessGroupCollection.use_mpu_process_groups(), spec,
                                          fusion=spec == "te").to(dev)
        layer.train()
        x = torch.randn(a.seq, a.mb, a.hidden, device=dev, dtype=cfg.torch_dtype) * 0.5
        x.requires_grad_(True)
        go = torch.randn_like(x)

        def step():
            out, _ = layer(x)
            out.backward(go)

        times = time_steps(step, a.warmup, a.iters)
        kept, peak = 0, 0.0
        if cuda:
            layer.zero_grad(set_to_none=False)
            x.grad = None
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out, _ = layer(x)
            kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
            out.backward(go)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
    T, h, f, k = a.seq * a.mb, a.hidden, a.ffn, 8
    flops = 3 * 2 * T * (h * a.experts + k * 3 * h * f + 3 * h * f)     # router + routed + 1 shared
    return {"ms": statistics.median(times), "all_ms": times, "peak_gib": peak, "kept_gib": kept / 2 ** 30,
            "tflops": flops / (statistics.median(times) * 1e-3) / 1e12,
            "device": torch.cuda.get_device_name(0) if cuda else "CPU", "torch": torch.__version__,
            "experts_class": type(getattr(layer, "experts", None)).__name__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", default=None, help="NAME=PATH of a source tree (default: this tree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mb", type=int, default=1)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--peer", action="append", default=[], choices=["local", "te"],
                   help="also time megatron-core's MoELayer (its GPT layer spec: local, or TE with grouped GEMM and "
                        "permute fusion), each in its own processes, alternating with ours")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    srcs = [s.split("=", 1) + ["ours"] for s in (a.src or [f"ours={here}"])]
    srcs += [[f"megatron-core MoELayer ({p} spec)", srcs[0][1], f"mcore-{p}"] for p in a.peer]
    runs = {name: [] for name, _, _ in srcs}
    info = {}
    for r in range(a.rounds):
        for name, path, impl in (srcs if r % 2 == 0 else srcs[::-1]):      # alternate the order each round
            cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--impl", impl, "--warmup", str(a.warmup),
                   "--iters", str(a.iters), "--seq", str(a.seq), "--mb", str(a.mb), "--hidden", str(a.hidden),
                   "--experts", str(a.experts), "--ffn", str(a.ffn)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                runs[name].append({"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
            else:
                res = json.loads(line[0][7:])
                info = {k: res[k] for k in ("device", "torch")}
                runs[name].append(res)
            print(name, r, runs[name][-1].get("ms", runs[name][-1].get("error")), flush=True)
    lines = [f"# DeepSeekMoE alone, forward+backward ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"{info.get('device', '?')}, torch {info.get('torch', '?')}; hidden {a.hidden}, {a.experts} experts top-8 "
             f"(8 groups top-4), 1 shared, expert FFN {a.ffn}, tokens {a.seq} x {a.mb}, bf16; {a.rounds} fresh "
             f"processes per variant, alternating; median of {a.iters} steps each", "",
             "| variant | experts module | ms per round | median ms | model TFLOP/s | of 779 | peak GiB | "
             "kept for backward GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        ok = [x for x in rs if "ms" in x]
        if not ok:
            lines.append(f"| {name} | | error: {rs[-1].get('error')} | | | | | |")
            continue
        ms = statistics.median(x["ms"] for x in ok)
        tf = statistics.median(x["tflops"] for x in ok)
        per_round = ", ".join("%.2f" % x["ms"] for x in ok)
        lines.append(f"| {name} | {ok[0].get('experts_class', '?')} | {per_round} | {ms:.2f} | {tf:.0f} | "
                     f"{100 * tf / MATMUL_TFLOPS:.0f}% | {max(x['peak_gib'] for x in ok):.2f} | "
                     f"{max(x['kept_gib'] for x in ok):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
