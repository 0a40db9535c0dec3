"""FP8 kernels on a Hopper GPU: what cuBLAS's block-scaled GEMM accepts, FP32 accumulation at K = 16384, quantiser
bandwidth against a device copy, GEMM TFLOP/s per DeepSeek-V3 shape against bf16 and raw torch._scaled_mm.

    python bench/bench_fp8.py --out DIR [--sections probe,accum,quant,gemm,grouped,wquant,tgrouped,experts,linear]

tgrouped: the Triton grouped GEMM (fp8/grouped_gemm.py) vs the host loop vs bf16 _grouped_mm, per expert shape and
launch config, uniform and skewed loads, and its host-sync check; wquant: the 128x128 weight quantiser (Triton,
with and without the transposed copy) vs quant.py; experts: FP8 experts fwd+bwd, weight cache on/off,
host loop vs Triton, against BF16; linear: one linear's fwd+bwd, our BF16 vs FP8Linear vs TE's block-scaled Linear
(the issue's 16384 x 7168 -> 18432). (The default --sections keeps the older five.)

Writes DIR/results_fp8.md (and .json). Variants of one section alternate within each round (round-robin), the
figure is the median over rounds of each round's median of `--iters` CUDA-event-timed calls.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.fp8 import gemm, kernels, quant  # noqa: E402

FP8 = torch.float8_e4m3fn
COPY_TBS = None


def timed(fn, iters, reps=1):
    """Median ms of fn over iters timings; reps > 1: each timing spans reps back-to-back calls (the kernel's own
    time, its launch hidden behind the previous call's, as in a training step) and is divided by reps."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / reps)
    return sorted(ts)[len(ts) // 2]


def alternate(variants, rounds, iters, reps=1):
    """{name: fn} -> {name: median ms}, the variants round-robin within each round (timed's reps)."""
    got = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            try:
                got[k].append(timed(fn, iters, reps))
            except Exception as err:  # a variant this torch does not take: say so, keep going
                got[k].append(float("nan"))
                print(f"  {k}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    return {k: sorted(v)[len(v) // 2] for k, v in got.items()}


def rel_err(out, exact):
    return ((out.double() - exact).norm() / exact.norm()).item()


def deq_exact(qa, sa, qb, sb, b_scaling):
    return quant.dequantized_matmul(qa, sa.contiguous(), qb, sb.contiguous(), b_scaling=b_scaling)


# ---- probe ------------------------------------------------------------------------------------------------------
def probe(lines, res):
    dev = "cuda"
    lines.append("## What cuBLAS's block-scaled `torch._scaled_mm` takes\n")
    M = N = K = 512
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(M, K, device=dev, generator=g)
    b = torch.randn(N, K, device=dev, generator=g)
    T = K // 128
    qa, sa_t = quant.quantize_tiles(a)
    qa_b, sa_b = quant.quantize_blocks(a)
    qb, sb_b = quant.quantize_blocks(b)
    qb_t, sb_t = quant.quantize_tiles(b)
    args_a = {"1x128": (qa, sa_t.t().contiguous().t(), sa_t, "tiles"), "128x128": (qa_b, sa_b, sa_b, "blocks")}
    args_b = {"128x128": (qb, sb_b.t(), sb_b, "blocks"), "1x128": (qb_t, sb_t.t().contiguous(), sb_t, "tiles")}
    rows = []
    for la, (xa, scale_a, sa_plain, a_kind) in args_a.items():
        for lb, (xb, scale_b, sb_plain, b_kind) in args_b.items():
            for od in (torch.bfloat16, torch.float32, torch.float16):
                try:
                    out = torch._scaled_mm(xa, xb.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=od)
                    A = (quant.dequantize_tiles(xa, sa_plain, dtype=torch.float64) if a_kind == "tiles"
                         else quant.dequantize_blocks(xa, sa_plain, dtype=torch.float64))
                    B = (quant.dequantize_tiles(xb, sb_plain, dtype=torch.float64) if b_kind == "tiles"
                         else quant.dequantize_blocks(xb, sb_plain, dtype=torch.float64))
                    r = f"ok, rel err {rel_err(out, A @ B.T):.2e}"
                except Exception as err:
                    r = f"refused: {str(err).splitlines()[0][:90]}"
                rows.append((la, lb, str(od).replace("torch.", ""), r))
    lines.append("| A scaling | B scaling | out | result (512^3) |\n|---|---|---|---|")
    lines += [f"| {a} | {b} | {o} | {r} |" for a, b, o, r in rows]
    res["pairs"] = rows

    # alignment: our wrapper with padding switched off, against the float32 emulation
    lines.append("\nSizes, 1x128 x 128x128, bf16 out, straight into `_scaled_mm` (no padding) vs the emulation:\n")
    lines.append("| M | N | K | unpadded (K to 128 only) | through fp8_gemm (pads M%4, N%16, K%512) |\n|---|---|---|---|---|")
    shapes = [(256, 256, 512)] + [(m, 256, 512) for m in (1, 4, 8, 17, 100, 200)] + \
             [(256, n, 512) for n in (16, 17, 100, 136, 200)] + [(256, 256, k) for k in (16, 64, 100, 144, 300, 384)]
    saved = dict(gemm._ALIGN)
    align_rows = []
    for (m, n, k) in shapes:
        x = torch.randn(m, k, device=dev, generator=g)
        w = torch.randn(n, k, device=dev, generator=g)
        xq, xs = quant.quantize_tiles(x)
        wq, ws = quant.quantize_blocks(w)
        ref = gemm.fp8_gemm_emulated(xq, xs, wq, ws, torch.float32).double()
        res_row = []
        for align in ({"M": 1, "N": 1, "K_BLOCKS": 1}, saved):
            gemm._ALIGN.update(align)
            try:
                out = gemm.fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
                e = rel_err(out, ref)
                res_row.append(("ok" if e < 8e-3 else "**WRONG**") + f" ({e:.1e})")
            except Exception as err:
                res_row.append(f"refused: {str(err).splitlines()[0][:70]}")
        gemm._ALIGN.update(saved)
        align_rows.append((m, n, k, *res_row))
        lines.append(f"| {m} | {n} | {k} | {res_row[0]} | {res_row[1]} |")
    res["align"] = align_rows
    lines.append("\nK blocks per pair, padding off (K_BLOCKS=1), 256x256:\n")
    lines.append("| B scaling | K | result |\n|---|---|---|")
    for b_scaling in ("blocks", "tiles"):
        for k in (128, 256, 384, 512, 640, 1024):
            x = torch.randn(256, k, device=dev, generator=g)
            w = torch.randn(256, k, device=dev, generator=g)
            xq, xs = quant.quantize_tiles(x)
            wq, ws = quant.quantize_blocks(w) if b_scaling == "blocks" else quant.quantize_tiles(w)
            ref = gemm.fp8_gemm_emulated(xq, xs, wq, ws, torch.float32).double()
            gemm._ALIGN.update({"K_BLOCKS": 1})
            try:
                e = rel_err(gemm.fp8_gemm(xq, xs, wq, ws, torch.bfloat16), ref)
                r = ("ok" if e < 8e-3 else "**WRONG**") + f" ({e:.1e})"
            except Exception as err:
                r = f"refused: {str(err).splitlines()[0][:70]}"
            gemm._ALIGN.update(saved)
            lines.append(f"| {b_scaling} | {k} | {r} |")
    x = torch.randn(64, 7168, device=dev)
    lines.append(f"\nquant.py's scales on CUDA = on CPU: "
                 f"{torch.equal(quant.quantize_tiles(x)[1].cpu(), quant.quantize_tiles(x.cpu())[1])}")

    # grouped forms with block scales
    lines.append("\nGrouped block-scaled GEMM in this torch:\n")
    E, R = 4, 512
    offs = torch.tensor([128, 256, 384, 512], dtype=torch.int32, device=dev)
    xq, xs = quant.quantize_tiles(torch.randn(R, K, device=dev))
    ws = [quant.quantize_blocks(torch.randn(N, K, device=dev)) for _ in range(E)]
    wq = torch.stack([w[0] for w in ws])
    wsc = torch.stack([w[1] for w in ws])
    tries = {}
    F = torch.nn.functional
    if hasattr(F, "scaled_grouped_mm"):
        def f1():
            return F.scaled_grouped_mm(xq, wq.transpose(-2, -1), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                                       wsc.transpose(-2, -1), F.ScalingType.BlockWise128x128, offs=offs,
                                       output_dtype=torch.bfloat16)
        tries["F.scaled_grouped_mm(BlockWise1x128, BlockWise128x128)"] = f1
    if hasattr(torch, "_scaled_grouped_mm"):
        def f2():
            return torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs.t().contiguous().t(), wsc.transpose(-2, -1),
                                            offs=offs, out_dtype=torch.bfloat16)
        tries["torch._scaled_grouped_mm(1x128, 128x128 scales)"] = f2
    for name, fn in tries.items():
        try:
            out = fn()
            ref = gemm.fp8_grouped_gemm(xq, xs, wq, wsc, offs, torch.float64)
            lines.append(f"- {name}: ran, rel err {rel_err(out, ref):.2e}")
        except Exception as err:
            lines.append(f"- {name}: refused: {str(err).splitlines()[0][:160]}")
    if not tries:
        lines.append("- no scaled_grouped_mm in this torch")


# ---- accumulation -----------------------------------------------------------------------------------------------
def round_bits(x, bits):
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2.0 ** bits) / 2.0 ** bits, e)


def accum(lines, res):
    """All-positive operands make the partial sums grow with K, so an accumulator's precision shows in the result:
    with promotion every 128 the error stays flat in K, a limited accumulator without promotion grows with K."""
    dev = "cuda"
    M = N = 256
    g = torch.Generator(device=dev).manual_seed(1)
    Ks = (128, 1024, 4096, 16384)
    lines.append(f"\n## Accumulation precision: A, B uniform in [0, 1) (all partial sums grow), {M}x{N}, rel. error "
                 f"vs float64 (Frobenius)\n")
    lines.append("| what | " + " | ".join(f"K={k}" for k in Ks) + " |\n|---|" + "---|" * len(Ks))
    table = {}
    for K in Ks:
        a = torch.rand(M, K, device=dev, generator=g)
        b = torch.rand(N, K, device=dev, generator=g)
        qa, sa = kernels.quantize_tiles_fast(a)
        qb, sb = quant.quantize_blocks(b)
        A = quant.dequantize_tiles(qa, sa.contiguous(), dtype=torch.float64)
        B = quant.dequantize_blocks(qb, sb, dtype=torch.float64)
        exact = A @ B.T
        rows = {}
        rows["cuBLAS block-scaled `_scaled_mm`, float32 out"] = gemm.fp8_gemm(qa, sa, qb, sb, torch.float32)
        rows["emulation: FP32 accumulation, promotion every 128 (gemm.fp8_gemm_emulated)"] = \
            gemm.fp8_gemm_emulated(qa, sa, qb, sb, torch.float32)

        def limited(bits, promote_every, mode):
            # WGMMA adds 32-wide groups of products into an accumulator of `bits` significant bits (rounded or
            # truncated); every `promote_every` of K the partial goes into an exact total
            total = torch.zeros(M, N, dtype=torch.float64, device=dev)
            part = torch.zeros_like(total)
            for k0 in range(0, K, 32):
                v = part + A[:, k0:k0 + 32] @ B[:, k0:k0 + 32].T
                m, ex = torch.frexp(v)
                m = m * 2.0 ** bits
                part = torch.ldexp((torch.round(m) if mode == "rn" else torch.trunc(m)) / 2.0 ** bits, ex)
                if (k0 + 32) % promote_every == 0:
                    total += part
                    part.zero_()
            return total + part
        for mode in ("rn", "rz"):
            rows[f"emulation: 14-bit accumulator ({mode}), no promotion"] = limited(14, K, mode)
            rows[f"emulation: 14-bit accumulator ({mode}), promoted every 128"] = limited(14, 128, mode)
        for k, v in rows.items():
            table.setdefault(k, []).append(((v.double() - exact).norm() / exact.norm()).item())
    for k, v in table.items():
        lines.append(f"| {k} | " + " | ".join(f"{e:.2e}" for e in v) + " |")
    res["accum"] = table


# ---- quantisers ---------------------------------------------------------------------------------------------------
def quant_bench(lines, res, rounds, iters):
    dev = "cuda"
    lines.append("\n## Quantisers, bf16 input (GB/s = bytes read + written / time; 20 calls back to back per "
                 "timing: a small kernel's launch hidden as in a step)\n")
    lines.append("| shape | variant | bit-exact vs quant.py | ms | GB/s | % of copy |\n|---|---|---|---|---|---|")
    for (M, K) in ((16384, 7168), (32768, 2048)):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        E = 32
        offs = torch.full((E,), M // E, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
        ref_t = quant.quantize_tiles(x)
        ref_tt = quant.quantize_tiles_and_transpose(x)
        ref_g = quant.quantize_columns_grouped(x, offs)
        row_tiles = kernels.bounded_row_tiles(offs, M)
        nb_tiles = 2 * M * K + M * K + 4 * M * K // 128
        variants, nbytes, exact = {}, {}, {}
        variants["device copy"] = lambda: y.copy_(x)
        nbytes["device copy"] = 4 * M * K
        for bm in (8, 16, 32, 64):
            for nw in (4, 8):
                name = f"quantize_tiles_triton BM={bm} warps={nw}"
                variants[name] = (lambda bm=bm, nw=nw: kernels.quantize_tiles_triton(x, False, bm, nw))
                nbytes[name] = nb_tiles
                got = kernels.quantize_tiles_triton(x, False, bm, nw)
                exact[name] = all(_eq(u, v) for u, v in zip(got, ref_t))
        variants["quant.quantize_tiles (plain torch)"] = lambda: quant.quantize_tiles(x)
        nbytes["quant.quantize_tiles (plain torch)"] = nb_tiles
        for nw in (4, 8, 16):
            name = f"quantize_tiles_and_transpose_triton warps={nw}"
            variants[name] = (lambda nw=nw: kernels.quantize_tiles_and_transpose_triton(x, False, nw))
            nbytes[name] = 2 * nb_tiles - 2 * M * K
            exact[name] = all(_eq(u, v) for u, v in zip(kernels.quantize_tiles_and_transpose_triton(x, False, nw),
                                                         ref_tt))
            name = f"quantize_columns_grouped_triton (32 experts) warps={nw}"
            # row_tiles as the FP8 experts pass them (bounded_row_tiles: no host read-back of offs per call)
            variants[name] = (lambda nw=nw: kernels.quantize_columns_grouped_triton(x, offs, False, nw,
                                                                                    row_tiles=row_tiles))
            nbytes[name] = nb_tiles
            exact[name] = all(_eq(u, v) for u, v in zip(kernels.quantize_columns_grouped_triton(x, offs, False, nw),
                                                         ref_g))
        ms = alternate(variants, rounds, iters, reps=20)
        copy = nbytes["device copy"] / ms["device copy"] / 1e6
        for k, t in ms.items():
            gbs = nbytes[k] / t / 1e6
            lines.append(f"| {M}x{K} | {k} | {exact.get(k, '')} | {t:.3f} | {gbs:.0f} | {100 * gbs / copy:.0f}% |")
            res.setdefault("quant", {})[f"{M}x{K} {k}"] = (t, gbs, exact.get(k))


def wquant_bench(lines, res, rounds, iters, dev="cuda", shapes=((32, 7168, 4096), (32, 2048, 7168), (1, 18432, 7168))):
    """The weight quantiser (kernels.quantize_blocks_triton: 128x128 blocks, a stack of experts in one launch, with
    and without the transposed copy from the same read) against quant.quantize_blocks (what ran before) and a copy.
    Once per optimizer step with the weight cache; every micro-batch without it."""
    lines.append("\n## Weight quantiser, 128x128 blocks, bf16 weights (GB/s = bytes read + written / time)\n")
    lines.append("| weights | variant | bit-exact vs quant.py | ms | GB/s | % of copy |\n|---|---|---|---|---|---|")
    for (E, N, K) in shapes:
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(w)
        ref = quant.quantize_blocks(w[0])
        nb = 3 * E * N * K
        variants = {"device copy": lambda: y.copy_(w),
                    "quant.quantize_blocks (plain torch, per expert)": lambda: [quant.quantize_blocks(we) for we in w]}
        nbytes = {"device copy": 4 * E * N * K, "quant.quantize_blocks (plain torch, per expert)": nb}
        exact = {}
        for nw in (4, 8, 16):
            for tr in (False, True):
                name = f"quantize_blocks_triton warps={nw}{' + transposed copy' if tr else ''}"
                variants[name] = (lambda nw=nw, tr=tr: kernels.quantize_blocks_triton(w, False, tr, nw))
                nbytes[name] = nb + (E * N * K if tr else 0)
                got = kernels.quantize_blocks_triton(w, False, tr, nw)
                exact[name] = _eq(got[0][0], ref[0]) and _eq(got[1][0], ref[1]) and (
                    not tr or _eq(got[2][0], ref[0].t().contiguous()))
            name = f"quantize_blocks_triton warps={nw}, W^T's blocks only (straight=False)"
            variants[name] = (lambda nw=nw: kernels.quantize_blocks_triton(w, False, True, nw, straight=False))
            nbytes[name] = nb
            got = kernels.quantize_blocks_triton(w, False, True, nw, straight=False)
            exact[name] = _eq(got[0][0], ref[0].t().contiguous()) and _eq(got[1][0], ref[1].t().contiguous())
        ms = alternate(variants, rounds, iters, reps=5)
        copy = nbytes["device copy"] / ms["device copy"] / 1e6
        for k, t in ms.items():
            gbs = nbytes[k] / t / 1e6
            lines.append(f"| {E}x{N}x{K} | {k} | {exact.get(k, '')} | {t:.3f} | {gbs:.0f} | {100 * gbs / copy:.0f}% |")
            res.setdefault("wquant", {})[f"{E}x{N}x{K} {k}"] = (t, gbs, exact.get(k))
        del w, y


def _eq(u, v):
    if u.dtype == FP8:
        return torch.equal(u.view(torch.uint8), v.view(torch.uint8))
    return torch.equal(u, v)


# ---- GEMMs ------------------------------------------------------------------------------------------------------
def gemm_bench(lines, res, rounds, iters):
    dev = "cuda"
    lines.append("\n## FP8 GEMM by shape (1x128 x 128x128, bf16 out), TFLOP/s\n")
    lines.append("| M, N, K | bf16 torch.mm | raw `_scaled_mm` | fp8_gemm | fp8_gemm / raw | Wgrad form 1x128 x 1x128 raw "
                 "| rel err vs float64 |\n|---|---|---|---|---|---|---|")
    for (M, N, K) in ((4096, 7168, 16384), (4096, 4096, 7168), (4096, 24576, 1536), (4096, 7168, 2048),
                      (16384, 18432, 7168), (8192, 8192, 8192)):
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        qa, sa = kernels.quantize_tiles_fast(a)
        qw, sw = quant.quantize_blocks(w)
        qwt, swt = kernels.quantize_tiles_fast(w)
        sa_cm = sa.t().contiguous().t()
        sw_arg = sw.t()
        swt_arg = swt.t().contiguous()
        v = {
            "bf16": lambda: torch.mm(a, w.t()),
            "raw": lambda: torch._scaled_mm(qa, qw.t(), scale_a=sa_cm, scale_b=sw_arg, out_dtype=torch.bfloat16),
            "fp8_gemm": lambda: gemm.fp8_gemm(qa, sa, qw, sw),
            "raw tiles": lambda: torch._scaled_mm(qa, qwt.t(), scale_a=sa_cm, scale_b=swt_arg,
                                                  out_dtype=torch.bfloat16),
        }
        ms = alternate(v, rounds, iters)
        tf = {k: 2 * M * N * K / t / 1e9 for k, t in ms.items()}
        err = ""
        if M * N * K <= 4096 * 4096 * 7168:
            out = gemm.fp8_gemm(qa, sa, qw, sw, torch.float32)
            err = f"{rel_err(out, deq_exact(qa, sa, qw, sw, 'blocks')):.1e}"
        lines.append(f"| {M}, {N}, {K} | {tf['bf16']:.0f} | {tf['raw']:.0f} | {tf['fp8_gemm']:.0f} | "
                     f"{tf['fp8_gemm'] / tf['raw']:.2f} | {tf['raw tiles']:.0f} | {err} |")
        res.setdefault("gemm", {})[f"{M},{N},{K}"] = tf


def grouped_bench(lines, res, rounds, iters):
    dev = "cuda"
    E, R = 32, 4096 * 8
    lines.append(f"\n## Routed experts: {E} experts, {R} rows ({R // E} each), TFLOP/s\n")
    lines.append("| GEMM | bf16 `torch._grouped_mm` | per-expert raw `_scaled_mm` loop | fp8_grouped_gemm / "
                 "fp8_grouped_wgrad | rel err vs float64 (expert 0) |\n|---|---|---|---|---|")
    offs = torch.full((E,), R // E, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
    bounds = list(zip([0] + offs.tolist()[:-1], offs.tolist()))
    for (K, N) in ((7168, 4096), (2048, 7168)):
        a = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
        qa, sa = kernels.quantize_tiles_fast(a)
        qs = [quant.quantize_blocks(w[e]) for e in range(E)]
        qw, sw = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
        sa_e = [sa[x:y].t().contiguous().t() for x, y in bounds]
        out = torch.empty(R, N, device=dev, dtype=torch.bfloat16)

        def raw_loop():
            for e, (x, y) in enumerate(bounds):
                out[x:y] = torch._scaled_mm(qa[x:y], qw[e].t(), scale_a=sa_e[e], scale_b=sw[e].t(),
                                            out_dtype=torch.bfloat16)
        v = {"bf16": lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs),
             "raw": raw_loop,
             "ours": lambda: gemm.fp8_grouped_gemm(qa, sa, qw, sw, offs)}
        ms = alternate(v, rounds, iters)
        tf = {k: 2 * R * N * K / t / 1e9 for k, t in ms.items()}
        got = gemm.fp8_grouped_gemm(qa, sa, qw, sw, offs, torch.float32)[:R // E]
        err = rel_err(got, deq_exact(qa[:R // E], sa[:R // E], qw[0], sw[0], "blocks"))
        lines.append(f"| Fprop {K} -> {N} | {tf['bf16']:.0f} | {tf['raw']:.0f} | {tf['ours']:.0f} | {err:.1e} |")
        res.setdefault("grouped", {})[f"fprop {K}->{N}"] = tf

        # Wgrad: dW_e [N, K] = dy_e^T x_e
        dy = torch.randn(R, N, device=dev, dtype=torch.bfloat16)
        dqt, dst, offs_p = kernels.quantize_columns_grouped_fast(dy, offs)
        xqt, xst, _ = kernels.quantize_columns_grouped_fast(a, offs)
        dw = torch.empty(E, N, K, device=dev, dtype=torch.float32)
        v = {"bf16": lambda: torch._grouped_mm(dy.t(), a, offs=offs),
             "ours": lambda: gemm.fp8_grouped_wgrad(dqt, dst, xqt, xst, offs_p, torch.float32, out=dw),
             "ours bf16 out": lambda: gemm.fp8_grouped_wgrad(dqt, dst, xqt, xst, offs_p, torch.bfloat16)}
        ms = alternate(v, rounds, iters)
        tf = {k: 2 * R * N * K / t / 1e9 for k, t in ms.items()}
        n0 = R // E
        qd, sd = quant.quantize_columns(dy[:n0])
        qx, sx = quant.quantize_columns(a[:n0])
        ex = (quant.dequantize_columns(qd, sd, dtype=torch.float64).T
              @ quant.dequantize_columns(qx, sx, dtype=torch.float64))
        gemm.fp8_grouped_wgrad(dqt, dst, xqt, xst, offs_p, torch.float32, out=dw)
        err = rel_err(dw[0], ex)
        lines.append(f"| Wgrad {K} -> {N} (fp32 out; bf16 out {tf['ours bf16 out']:.0f}) | {tf['bf16']:.0f} | | "
                     f"{tf['ours']:.0f} | {err:.1e} |")
        res.setdefault("grouped", {})[f"wgrad {K}->{N}"] = tf


def _skewed_counts(E, R, seed=0):
    """Token counts of a skewed router: multinomial over a Zipf-like expert popularity, some experts near empty."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    idx = torch.multinomial(p[torch.randperm(E, generator=g)], R, replacement=True, generator=g)
    return torch.bincount(idx, minlength=E)


def tgrouped_bench(lines, res, rounds, iters, dev="cuda", E=32, R=4096 * 8, shapes=None):
    """fp8/grouped_gemm.py (one Triton launch, offsets on the device) against the host loop of cuBLAS GEMMs
    (gemm.fp8_grouped_gemm's default) and bf16 torch._grouped_mm, per DeepSeek-V3 expert shape, uniform and skewed
    expert loads; launch configs of the Triton kernel side by side; and a check that it makes no host sync."""
    from megatron_dsv3.fp8.grouped_gemm import fp8_grouped_gemm_triton
    lines.append(f"\n## Triton grouped FP8 GEMM (fp8/grouped_gemm.py): {E} experts, {R} rows, TFLOP/s (bf16 out)\n")
    # (block_m, block_n, warps, stages, group_m): group_m 0 is the 2-D program order, g > 0 groups of g row tiles
    # (L2 reuse); the first is the default, the last the default before 2026-11-30
    configs = [(64, 128, 4, 4, 16), (64, 128, 4, 3, 16), (64, 128, 4, 4, 8), (64, 128, 4, 4, 32), (64, 256, 8, 4, 16),
               (128, 128, 8, 4, 8), (128, 256, 8, 3, 8), (128, 128, 8, 3, 0)]
    cols = ["bf16 `_grouped_mm`", "host loop"] + [f"triton {m}x{n} w={w} s={st} g={g}"
                                                  for m, n, w, st, g in configs]
    lines.append("| GEMM (K -> N) | loads | " + " | ".join(cols) + " | triton vs host loop rel err |")
    lines.append("|---|---|" + "---|" * len(cols) + "---|")
    wshapes = [("dW1", 4096, 7168), ("dW2", 7168, 2048)] if shapes is None else [(n, N, K) for n, K, N in shapes]
    shapes = shapes or [("Fprop up", 7168, 4096), ("Fprop down", 2048, 7168), ("Dgrad up", 4096, 7168),
                        ("Dgrad down", 7168, 2048)]
    for loads in ("uniform", "skewed"):
        counts = torch.full((E,), R // E) if loads == "uniform" else _skewed_counts(E, R)
        offs = counts.cumsum(0).to(torch.int32).to(dev)
        for name, K, N in shapes:
            a = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
            qa, sa = kernels.quantize_tiles_fast(a)
            q, s = quant.quantize_blocks(w.reshape(E * N, K))
            qw, sw = q.view(E, N, K), s.view(E, N // 128, -1)
            v = {cols[0]: lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs),
                 cols[1]: lambda: gemm.fp8_grouped_gemm(qa, sa, qw, sw, offs)}
            for c, (m, n, nw, st, gm) in zip(cols[2:], configs):
                v[c] = (lambda m=m, n=n, nw=nw, st=st, gm=gm:
                        fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, block_m=m, num_warps=nw, num_stages=st,
                                                group_m=gm, block_n=n))
            ms = alternate(v, rounds, iters)
            tf = {k: 2 * R * N * K / t / 1e9 for k, t in ms.items()}
            ref = gemm.fp8_grouped_gemm(qa, sa, qw, sw, offs, torch.float32)
            got = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32)
            err = rel_err(got, ref.double())
            lines.append(f"| {name} {K} -> {N} | {loads} | " + " | ".join(f"{tf[c]:.0f}" for c in cols) +
                         f" | {err:.1e} |")
            res.setdefault("tgrouped", {})[f"{name} {K}->{N} {loads}"] = dict(tf, rel_err=err)
            del a, w, qa, sa, qw, sw, q, s
    # Wgrad: dW_e [N, K] = dy_e^T x_e over each expert's tokens (128x1 tiles, padded per expert), fp32 out
    from megatron_dsv3.fp8.grouped_gemm import fp8_grouped_wgrad_triton
    # (block_m, block_n, warps, stages), the first the default
    wconfigs = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (128, 256, 8, 4), (64, 256, 4, 4),
                (256, 128, 8, 3), (64, 128, 4, 4)]
    wcols = ["bf16 `_grouped_mm`", "host loop"] + [f"triton {m}x{n} w={w} s={st}" for m, n, w, st in wconfigs]
    lines.append("\n| Wgrad (tokens x N, tokens x K -> [E, N, K] fp32) | loads | " + " | ".join(wcols) +
                 " | triton vs host loop rel err |")
    lines.append("|---|---|" + "---|" * len(wcols) + "---|")
    for loads in ("uniform", "skewed"):
        counts = torch.full((E,), R // E) if loads == "uniform" else _skewed_counts(E, R)
        offs = counts.cumsum(0).to(torch.int32).to(dev)
        for name, N, K in wshapes:
            dy = torch.randn(R, N, device=dev, dtype=torch.bfloat16)
            x = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
            dqt, dst, offs_p = kernels.quantize_columns_grouped_fast(dy, offs)
            xqt, xst, _ = kernels.quantize_columns_grouped_fast(x, offs)
            dw = torch.empty(E, N, K, device=dev, dtype=torch.float32)
            v = {wcols[0]: lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                 wcols[1]: lambda: gemm.fp8_grouped_wgrad(dqt, dst, xqt, xst, offs_p, torch.float32, out=dw)}
            for c, (m, n, nw, st) in zip(wcols[2:], wconfigs):
                v[c] = (lambda m=m, n=n, nw=nw, st=st: fp8_grouped_wgrad_triton(
                    dqt, dst, xqt, xst, offs_p, torch.float32, out=dw, num_warps=nw, num_stages=st, block_m=m,
                    block_n=n))
            ms = alternate(v, rounds, iters)
            tf = {k: 2 * R * N * K / t / 1e9 for k, t in ms.items()}
            ref = gemm.fp8_grouped_wgrad(dqt, dst, xqt, xst, offs_p, torch.float32)
            got = fp8_grouped_wgrad_triton(dqt, dst, xqt, xst, offs_p, torch.float32)
            err = rel_err(got, ref.double())
            lines.append(f"| {name} {N}x{K} | {loads} | " + " | ".join(f"{tf[c]:.0f}" for c in wcols) +
                         f" | {err:.1e} |")
            res.setdefault("tgrouped", {})[f"wgrad {name} {N}x{K} {loads}"] = dict(tf, rel_err=err)
            del dy, x, dqt, xqt, dw, ref, got
    if dev != "cuda":
        return
    # no host sync: CUDA's sync debug mode raises on any synchronising call
    torch.cuda.synchronize()
    qa, sa = kernels.quantize_tiles_fast(torch.randn(R, 2048, device=dev, dtype=torch.bfloat16))
    q, s = quant.quantize_blocks(torch.randn(E * 7168, 2048, device=dev, dtype=torch.bfloat16))
    offs = torch.full((E,), R // E, device=dev).cumsum(0).to(torch.int32)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_grouped_gemm_triton(qa, sa, q.view(E, 7168, 2048), s.view(E, 56, -1), offs)
        sync = "none (sync debug mode 'error' passed)"
    except RuntimeError as err:
        sync = f"SYNCS: {str(err)[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    lines.append(f"\nHost syncs in fp8_grouped_gemm_triton: {sync}")
    res.setdefault("tgrouped", {})["host_sync"] = sync


def experts_bench(lines, res, rounds, iters, dev="cuda", E=32, T=4096, k=8, h=7168, f=2048):
    """The routed experts' fwd+bwd (fp8/experts.py) at DeepSeek-V3 width, 4096 tokens top-8 over 32 local experts:
    BF16 GroupedExperts vs FP8 with and without the per-step weight cache, host loop vs Triton grouped GEMM. Cached
    variants time micro-batches after the step's first (the copies are made on the first call, then hit)."""
    from megatron_dsv3.fp8.experts import fp8_expert_mlp
    from megatron_dsv3.fp8.weight_cache import drop_caches
    from megatron_dsv3.moe.experts import GroupedExperts
    R = T * k
    counts = torch.full((E,), R // E, device=dev)
    x = torch.randn(R, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(R, h, device=dev, dtype=torch.bfloat16)
    w1 = torch.nn.Parameter(torch.randn(E, h, 2 * f, device=dev, dtype=torch.bfloat16) * 0.02)
    w2 = torch.nn.Parameter(torch.randn(E, f, h, device=dev, dtype=torch.bfloat16) * 0.02)
    holder = torch.nn.ParameterList([w1, w2])

    def step(fn):
        def run():
            x.grad = w1.grad = w2.grad = None
            fn().backward(dy)
        return run

    v = {"bf16": step(lambda: GroupedExperts.expert_mlp(None, x, counts, w1, w2))}
    for grouped in ("host_loop", "triton"):
        v[f"fp8 {grouped}, no cache"] = step(lambda g=grouped: fp8_expert_mlp(x, counts, w1, w2, False, g))
        v[f"fp8 {grouped}, cache"] = step(lambda g=grouped: fp8_expert_mlp(x, counts, w1, w2, True, g))
    ms = alternate(v, rounds, iters)
    drop_caches(holder)
    lines.append(f"\n## Routed experts fwd+bwd: {E} experts, {T} tokens top-{k}, h {h}, f {f} (ms)\n")
    lines.append("| variant | ms | vs bf16 |\n|---|---|---|")
    for name, t in ms.items():
        lines.append(f"| {name} | {t:.2f} | {ms['bf16'] / t:.2f}x |")
    res["experts"] = ms


def linear_bench(lines, res, rounds, iters, dev="cuda", shapes=((16384, 7168, 18432), (4096, 7168, 18432),
                                                                 (4096, 18432, 7168))):
    """One linear's forward + backward (dx and dW), M tokens x K -> N: our BF16 linear (fused_wgrad's matmul: dW
    accumulated into .grad by the GEMM), FP8Linear (fp8/linear.py; weight cache off, and on for micro-batches after
    the step's first), and Transformer Engine's Linear under its Float8BlockScaling recipe where TE imports
    (its BF16 Linear too). The issue's bar: FP8Linear >= 1.5x our BF16 at 16384 x 7168 -> 18432."""
    from megatron_dsv3.fp8.linear import fp8_linear
    from megatron_dsv3.fp8.weight_cache import drop_caches
    from megatron_dsv3.fused_wgrad import matmul_fused_wgrad
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except Exception:  # noqa: BLE001  TE absent or broken: its rows are left out
        te = None
    lines.append("\n## One linear, forward + backward (dx and dW), bf16 in/out (ms; x: vs our BF16)\n")
    head = ["ours BF16", "FP8Linear", "FP8Linear, cached weight"] + (["TE BF16", "TE Float8BlockScaling"] if te else [])
    lines.append("| M x K -> N | " + " | ".join(head) + " | TFLOP/s FP8Linear |")
    lines.append("|---|" + "---|" * len(head) + "---|")
    for M, K, N in shapes:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        w = torch.nn.Parameter(torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5)
        holder = torch.nn.ParameterList([w])

        def step(fn):
            def run():
                x.grad = None
                fn().backward(dy)
            return run
        v = {"ours BF16": step(lambda: matmul_fused_wgrad(x, w)),
             "FP8Linear": step(lambda: fp8_linear(x, w)),
             "FP8Linear, cached weight": step(lambda: fp8_linear(x, w, weight_cache=True))}
        if te is not None:
            lin = te.Linear(K, N, bias=False, params_dtype=torch.bfloat16, device=dev)
            recipe = Float8BlockScaling()

            def te_fp8():
                with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                    return lin(x)
            v["TE BF16"] = step(lambda: lin(x))
            v["TE Float8BlockScaling"] = step(te_fp8)
        ms = alternate(v, rounds, iters)
        drop_caches(holder)
        fl = 3 * 2 * M * N * K
        lines.append(f"| {M} x {K} -> {N} | " + " | ".join(
            f"{ms[k]:.3f}" + ("" if k == "ours BF16" else f" ({ms['ours BF16'] / ms[k]:.2f}x)") for k in head) +
            f" | {fl / ms['FP8Linear'] / 1e9:.0f} |")
        res.setdefault("linear", {})[f"{M}x{K}->{N}"] = ms
        del x, dy, w, holder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench")
    p.add_argument("--sections", default="probe,accum,quant,gemm,grouped")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [f"# FP8 kernels and GEMMs: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{datetime.date.today()}, commit {commit or '?'}\n"]
    res = {}
    for sec in args.sections.split(","):
        print("==", sec, flush=True)
        try:
            {"probe": lambda: probe(lines, res), "accum": lambda: accum(lines, res),
             "quant": lambda: quant_bench(lines, res, args.rounds, args.iters),
             "gemm": lambda: gemm_bench(lines, res, args.rounds, args.iters),
             "grouped": lambda: grouped_bench(lines, res, args.rounds, args.iters),
             "tgrouped": lambda: tgrouped_bench(lines, res, args.rounds, args.iters),
             "wquant": lambda: wquant_bench(lines, res, args.rounds, args.iters),
             "experts": lambda: experts_bench(lines, res, args.rounds, args.iters),
             "linear": lambda: linear_bench(lines, res, args.rounds, args.iters)}[sec]()
        except Exception:
            lines.append(f"\n{sec} failed:\n```\n{traceback.format_exc()[-1500:]}\n```")
        with open(os.path.join(args.out, "results_fp8.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "results_fp8.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
