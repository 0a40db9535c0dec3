"""TP=2 (2 gloo ranks, with and without sequence parallel) equals TP=1: outputs, input and weight grads, with
positions 0..s-1 and with packed-document positions given as the model gives them (rope angles, full sequence).

One spawn runs all cases. Sharded weight grads are gathered along their split dim; duplicated weights
(down-projections, latent norms) must get identical grads on both ranks - under sequence parallel after the
TP all-reduce megatron's finalize_model_grads applies to params marked `sequence_parallel`, done here by hand.
float32, max|tp2 - tp1| / max|tp1| < 1e-5 (only the summation order differs; measured ~1e-7).
"""
import dataclasses

import torch

from megatron_dsv3.testing import run_distributed
from tests.mla.common import CONFIGS, TP_DIM, build_ours, dsv3_config, full_state, hf_attention, load_ours, rel_err

# (config name, seq, sequence_parallel, recompute_up_proj, packed positions as the model passes them)
CASES = [("v3_yarn", 40, False, False, False), ("odd_halfsplit", 29, False, False, True),
         ("v3_yarn", 40, True, True, True), ("v2lite_noq", 34, True, False, False)]


def _rope_angles(mla, seq):
    """What DSV3Model hands every layer for packed documents: full-sequence angles [s, b, 1, d/2] (also under SP)."""
    from megatron_dsv3.mla.rope import RotaryEmbedding
    cut = seq // 3
    pos = torch.stack([torch.cat((torch.arange(cut), torch.arange(seq - cut))), torch.arange(seq) + 100])
    return RotaryEmbedding(mla).angles(pos)


def _data(hidden, seq):
    g = torch.Generator().manual_seed(11)
    return torch.randn(seq, 2, hidden, generator=g), torch.randn(seq, 2, hidden, generator=g)


def _run(name, seq, sp, recompute, packed, tp, rank):
    mla, heads, hidden, _ = CONFIGS[name]
    mla = dataclasses.replace(mla, recompute_up_proj=recompute)
    hf, _ = hf_attention(mla, heads, hidden, seq)
    ours = build_ours(dsv3_config(mla, heads, hidden, tp=tp, sequence_parallel=sp))
    load_ours(ours, full_state(hf), rank, tp)
    x, dy = _data(hidden, seq)
    if sp:  # this rank's sequence shard
        x, dy = x.chunk(tp, dim=0)[rank], dy.chunk(tp, dim=0)[rank]
    x = x.clone().requires_grad_()
    out, _ = ours(x, rotary_pos_emb=_rope_angles(mla, seq) if packed else None)
    out.backward(dy)
    marked = sorted(k for k, p in ours.named_parameters() if getattr(p, "sequence_parallel", False))
    if sp and tp > 1:  # finalize_model_grads: sum the grads of duplicated params over TP
        for p in ours.parameters():
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=ours.tp_group)
    return {"out": out.detach(), "dx": x.grad, "grads": {k: p.grad for k, p in ours.named_parameters()},
            "marked": marked}


def _tp2_rank(rank):
    return [_run(*case, tp=2, rank=rank) for case in CASES]


def test_tp2_equals_tp1(mcore_single):
    ranks = run_distributed(_tp2_rank, 2, tp=2, timeout=240)
    for i, (name, seq, sp, recompute, packed) in enumerate(CASES):
        ref = _run(name, seq, False, recompute, packed, tp=1, rank=0)
        r0, r1 = ranks[0][i], ranks[1][i]
        if sp:  # outputs and input grads are sequence shards
            out, dx = torch.cat([r0["out"], r1["out"]]), torch.cat([r0["dx"], r1["dx"]])
        else:   # replicated: both ranks hold the full tensors
            assert rel_err(r1["out"], r0["out"]) < 1e-6 and rel_err(r1["dx"], r0["dx"]) < 1e-6
            out, dx = r0["out"], r0["dx"]
        errs = {"out": rel_err(out, ref["out"]), "dx": rel_err(dx, ref["dx"])}
        for k, g in ref["grads"].items():
            dim = TP_DIM[k]
            if dim is None:
                assert rel_err(r1["grads"][k], r0["grads"][k]) < 1e-6, (name, k)
                errs[k] = rel_err(r0["grads"][k], g)
            else:
                errs[k] = rel_err(torch.cat([r0["grads"][k], r1["grads"][k]], dim=dim), g)
        assert max(errs.values()) < 1e-5, (name, sp, errs)
        duplicated = sorted(k for k in ref["grads"] if TP_DIM[k] is None)
        assert r0["marked"] == (duplicated if sp else []), (name, r0["marked"])
