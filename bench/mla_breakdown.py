"""Where MLA's step time goes, in one command: the block's CUDA kernel time by kind, then each piece alone.

    python bench/mla_breakdown.py --out bench/mla_breakdown.md     # H200: DeepSeek-V3 width, seq 4096, b 1
    python bench/mla_breakdown.py --smoke                           # CPU: tiny sizes, the same rows (a test runs it)

Rows (forward+backward, median of --iters after --warmup, one process; bench_stack.py gives the side-by-side table):
  * the block as bench_stack.py's `mla` part builds it: synchronised steps (bench_stack's figure) and back-to-back
    steps with one sync per --iters (what is left is kernel time: the host enqueues a step well inside it);
  * one profiled step's CUDA time by kind: GEMMs (cuBLAS nvjet / cutlass), attention (cuDNN / flash / SDPA
    kernels), the q/k/v assembly (mla/kernels.py), RMSNorm, everything else; each kind's FLOP rate where it has FLOPs;
  * each piece alone at the same sizes: the five projections as x @ W^T with both gradients, the two
    down-projections as one GEMM (what merging them would give), core attention through SDPA with cuDNN on
    [s, b, n, d] views (the layer's layout) and on contiguous [b, n, s, d] (and through FlashAttention-4 where it
    imports: bench/fetch_fa4.sh), the q/k/v assembly, the two latent norms.
    These are synchronised wall times: the small pieces (the norms, the assembly) are bound by their launches there,
    and the profiled rows give their kernel time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# attention first: cuDNN's SDPA kernels are named like cudnn_generated_..._sdpa_sm90_flash_..._wgmma_...
KINDS = (("attention", ("cudnn", "flash", "fmha", "sdpa", "attention")), ("GEMM", ("nvjet", "cutlass", "gemm", "xmma")),
         ("q/k/v assembly", ("_qkv_",)), ("RMSNorm", ("_rms_",)))


def _kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _median_ms(fn, warmup: int, iters: int) -> float:
    from timing import time_steps
    return statistics.median(time_steps(fn, warmup, iters))


def _back_to_back_ms(fn, iters: int) -> float:
    import torch
    import time
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def measure(a) -> dict:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "bench"))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    import torch.nn.functional as F
    import bench_stack as bs
    from megatron_dsv3.compat import get_process_group_collection
    from megatron_dsv3.mla.kernels import assemble_qkv
    from megatron_dsv3.norm import RMSNorm
    from megatron_dsv3.testing import single_process

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    w, n_it = a.warmup, a.iters
    cfg = bs.bench_config(a.smoke, 2).replace(seq_length=a.seq)
    mla = cfg.mla
    s, h, n = a.seq, cfg.hidden_size, cfg.num_attention_heads
    d_nope, d_rope, d_v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    dqk = d_nope + d_rope
    dt = cfg.torch_dtype
    out = {"device": torch.cuda.get_device_name(0) if cuda else "CPU", "torch": torch.__version__, "rows": []}
    rows = out["rows"]
    with single_process(backend="nccl" if cuda else "gloo"):
        torch.manual_seed(0)
        mod, loss_of, _ = bs.build("mla", "ours", cfg, dev, get_process_group_collection(None))
        go = []

        def step():
            o = loss_of(mod)
            if not go:
                go.append(torch.randn_like(o))
            o.backward(go[0])

        rows.append(("the block, synchronised steps", _median_ms(step, w, n_it), None))
        rows.append((f"the block, {n_it} steps back to back", _back_to_back_ms(step, n_it), None))
        if cuda:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            by_kind = {}
            for e in p.key_averages():
                if e.device_time_total > 0 and not e.key.startswith("aten::") and "Memcpy" not in e.key:
                    k = _kind(e.key)
                    by_kind[k] = by_kind.get(k, 0.0) + e.device_time_total / 1e3
            T = s
            gemm_flops = 3 * 2.0 * T * (h * (mla.q_lora_rank + mla.kv_lora_rank + d_rope)
                                        + mla.q_lora_rank * n * dqk + mla.kv_lora_rank * n * (d_nope + d_v)
                                        + n * d_v * h)
            attn_flops = 3.5 * 2.0 * T * T / 2 * n * (dqk + d_v)     # causal; backward 2.5x forward
            flops = {"GEMM": gemm_flops, "attention": attn_flops}
            out["kernels_total_ms"] = sum(by_kind.values())
            for k in [kk for kk, _ in KINDS] + ["other"]:
                if k in by_kind:
                    rows.append((f"profiled step: {k} kernels", by_kind[k], flops.get(k)))
        del mod

        def lin(K, Ns):
            x = torch.randn(s, K, device=dev, dtype=dt).requires_grad_(True)
            ws = [(0.02 * torch.randn(N, K, device=dev, dtype=dt)).requires_grad_(True) for N in Ns]
            gs = [torch.randn(s, N, device=dev, dtype=dt) for N in Ns]

            def f():
                x.grad = None
                for wt in ws:
                    wt.grad = None
                torch.autograd.backward([F.linear(x, wt) for wt in ws], gs)
            return _median_ms(f, w, n_it), 3 * 2.0 * s * K * sum(Ns)

        pieces = [(f"q_down {h}->{mla.q_lora_rank}", h, [mla.q_lora_rank]),
                  (f"kv_down {h}->{mla.kv_lora_rank + d_rope}", h, [mla.kv_lora_rank + d_rope]),
                  ("both down-projections, two GEMMs", h, [mla.q_lora_rank, mla.kv_lora_rank + d_rope]),
                  (f"both down-projections as one GEMM {h}->{mla.q_lora_rank + mla.kv_lora_rank + d_rope}", h,
                   [mla.q_lora_rank + mla.kv_lora_rank + d_rope]),
                  (f"q_up {mla.q_lora_rank}->{n * dqk}", mla.q_lora_rank, [n * dqk]),
                  (f"kv_up {mla.kv_lora_rank}->{n * (d_nope + d_v)}", mla.kv_lora_rank, [n * (d_nope + d_v)]),
                  (f"o_proj {n * d_v}->{h}", n * d_v, [h])]
        for name, K, Ns in pieces:
            ms, fl = lin(K, Ns)
            rows.append((name, ms, fl))

        from torch.nn.attention import SDPBackend, sdpa_kernel
        scale = dqk ** -0.5
        attn_flops = 3.5 * 2.0 * s * s / 2 * n * (dqk + d_v)
        from megatron_dsv3.mla.core_attention import fa4_attention, flash_attn_4
        fa4 = flash_attn_4() if cuda else None
        if fa4 is not None:                  # FlashAttention-4 where installed (bench/fetch_fa4.sh)
            fl = [torch.randn(s, 1, n, d, device=dev, dtype=dt, requires_grad=True) for d in (dqk, dqk, d_v)]
            g4 = []

            def att4():
                for t in fl:
                    t.grad = None
                o = fa4_attention(fa4, *fl, scale, True, False)
                if not g4:
                    g4.append(torch.randn_like(o))
                o.backward(g4[0])
            rows.append(("core attention (FlashAttention-4), [s, b, n, d] views", _median_ms(att4, w, n_it),
                         attn_flops))
        for layout in ("[s, b, n, d] views (the layer's)", "contiguous [b, n, s, d]"):
            if layout.startswith("contiguous"):
                q, k = (torch.randn(1, n, s, dqk, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
                v = torch.randn(1, n, s, d_v, device=dev, dtype=dt, requires_grad=True)
                leaves = (q, k, v)
            else:
                base = [torch.randn(s, 1, n, d, device=dev, dtype=dt, requires_grad=True) for d in (dqk, dqk, d_v)]
                leaves = base
            g = []

            def att():
                for t in leaves:
                    t.grad = None
                qq, kk, vv = (t.permute(1, 2, 0, 3) for t in leaves) if not layout.startswith("contiguous") \
                    else leaves
                ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cuda else sdpa_kernel([SDPBackend.MATH])
                with ctx:
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
                if not g:
                    g.append(torch.randn_like(o))
                o.backward(g[0])
            rows.append((f"core attention (SDPA {'cuDNN' if cuda else 'math'}), {layout}", _median_ms(att, w, n_it),
                         attn_flops))

        qq = torch.randn(s, 1, n, dqk, device=dev, dtype=dt, requires_grad=True)
        kv = torch.randn(s, 1, n, d_nope + d_v, device=dev, dtype=dt, requires_grad=True)
        kr = torch.randn(s, 1, d_rope, device=dev, dtype=dt, requires_grad=True)
        ang = torch.randn(s, 1, 1, d_rope // 2, device=dev)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        ga = []

        def asm():
            for t in (qq, kv, kr):
                t.grad = None
            o = assemble_qkv(qq, kv, kr, cos, sin, d_nope, mla.rope_interleave)
            if not ga:
                ga.extend(torch.randn_like(t) for t in o)
            torch.autograd.backward(o, ga)
        rows.append(("q/k/v assembly (mla/kernels.py)", _median_ms(asm, w, n_it), None))
        tc = cfg.to_transformer_config()
        for d in (mla.q_lora_rank, mla.kv_lora_rank):
            norm = RMSNorm(tc, d, eps=1e-6).to(dev, dt)
            xi = torch.randn(s, 1, d, device=dev, dtype=dt, requires_grad=True)
            gi = torch.randn(s, 1, d, device=dev, dtype=dt)

            def nf():
                xi.grad = None
                norm(xi).backward(gi)
            rows.append((f"RMSNorm over {d}", _median_ms(nf, w, n_it), None))
    return out


def table(res: dict, a, commit: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# MLA's step time by piece ({now:%Y-%m-%d %H:%M} UTC)", "",
             f"- device: {res['device']}; torch {res['torch']}; commit {commit}; "
             f"{'tiny preset, float32 (smoke)' if a.smoke else 'DeepSeek-V3 width, bf16'}; b 1 x seq {a.seq}; "
             f"median of {a.iters} after {a.warmup} warmup, forward+backward", ""]
    if "kernels_total_ms" in res:
        lines += [f"- profiled step: {res['kernels_total_ms']:.2f} ms of CUDA kernels", ""]
    lines += ["| piece | ms | TFLOP/s |", "|---|---|---|"]
    for name, ms, fl in res["rows"]:
        rate = f"{fl / (ms * 1e-3) / 1e12:.0f}" if fl else ""
        lines.append(f"| {name} | {ms:.3f} | {rate} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=None, help="tokens (default 4096; --smoke 16)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, float32")
    p.add_argument("--out", default="", help="write the table here too (markdown)")
    a = p.parse_args(argv)
    if a.seq is None:
        a.seq = 16 if a.smoke else 4096
    if a.seq <= 0 or a.iters <= 0 or a.warmup < 0:
        p.error("--seq and --iters must be positive, --warmup not negative")
    if a.smoke:
        a.warmup, a.iters = min(a.warmup, 1), min(a.iters, 2)
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from bench_stack import commit_id
    text = table(measure(a), a, commit_id())
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
