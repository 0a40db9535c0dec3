"""megatron_dsv3/pipeline/dualpipe.py: DualPipe and DualPipeV on gloo ranks against a sequential single-process run.

Stages are Linear-Tanh-Linear MLPs (width 8, float64) with an MSE criterion on the last stage, as DeepSeek's
examples' `ref_step`: one model, the micro-batches one after the other, `loss.backward()` each.

DualPipeV's gradients are bit-equal too (one copy per stage, W's in micro-batch order, as the reference
accumulates); a single-process DualPipeV on one rank (the V turns locally, no P2P) checks the engine without spawning.

Tolerances. Losses and outputs: bit-equal (`torch.equal`): each micro-batch goes through the same ops on the same
slices, and P2P moves bytes. Gradients: 1e-12 absolute (float64 reference, STYLE.md): a stage's gradient is a sum
over micro-batches whose association differs from the reference's under DualPipe (each copy sums its own direction's
micro-batches, then the two partial sums are added: (g0+..+g_{M/2-1}) + (g_{M/2}+..), not one running sum).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

from megatron_dsv3.testing import run_distributed

WIDTH, MBS = 8, 2


def _full_model(n_stages: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
                           for _ in range(n_stages)]).double()


def _data(m: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(m * MBS, WIDTH, generator=g, dtype=torch.float64),
            torch.randn(m * MBS, WIDTH, generator=g, dtype=torch.float64))


def criterion(out, target):
    return TF.mse_loss(out, target)


def _reference(variant: str, pp: int, m: int):
    model = _full_model(pp if variant == "dualpipe" else 2 * pp)
    x, lab = _data(m)
    losses, outs = [], []
    for xm, lm in zip(x.tensor_split(m), lab.tensor_split(m)):
        y = model(xm)
        loss = criterion(y, lm)
        loss.backward()
        losses.append(loss.detach())
        outs.append(y.detach())
    return torch.stack(losses), torch.cat(outs), [[p.grad for p in stage.parameters()] for stage in model]


def _stage_ids(variant: str, pp: int, rank: int):
    return (rank, pp - 1 - rank) if variant == "dualpipe" else (rank, 2 * pp - 1 - rank)


def _grads(pipe):
    return [[None if p.grad is None else p.grad.clone() for p in m.parameters()] for m in pipe.module]


def _rank(rank, variant, n_ranks, m, drop_w=False):
    pp = n_ranks
    from megatron_dsv3.pipeline import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from megatron_dsv3.pipeline.schedule import W
    full = _full_model(pp if variant == "dualpipe" else 2 * pp)
    modules = [copy.deepcopy(full[s]) for s in _stage_ids(variant, pp, rank)]
    x, lab = _data(m)
    if variant == "dualpipe":
        first, last = rank == 0, rank == pp - 1
        # first rank: inputs of the first half, labels of the second (the stream that ends on it), and vice versa
        inputs = (x.chunk(2)[0],) if first else (x.chunk(2)[1],) if last else ()
        labels = (lab.chunk(2)[1],) if first else (lab.chunk(2)[0],) if last else ()
    else:
        inputs, labels = ((x,), (lab,)) if rank == 0 else ((), ())
    set_p2p_tensor_shapes([(MBS, WIDTH)])      # the DeepSeek-compatible defaults, before constructing
    set_p2p_tensor_dtype(torch.float64)
    cls = DualPipe if variant == "dualpipe" else DualPipeV
    # DualPipe: the copies summed by the engine (opt-in); the default, DeepSeek's, is checked below as raw
    pipe = cls(modules, reduce_mirror_grads=True) if variant == "dualpipe" else cls(modules)
    if drop_w:     # a broken list: the last W left out
        ops = pipe.schedule(m)
        i = max(k for k, op in enumerate(ops) if isinstance(op, W))
        pipe.schedule = lambda n, training=True, ops=ops[:i] + ops[i + 1:]: ops
        try:
            pipe.step(*inputs, num_chunks=m, criterion=criterion, labels=labels)
        except RuntimeError as e:
            return str(e)
        return None
    out = {}
    out["loss"], out["outputs"] = pipe.step(*inputs, num_chunks=m, criterion=criterion, labels=labels,
                                            return_outputs=True)
    out["grads"] = _grads(pipe)
    pipe.step(*inputs, num_chunks=m, criterion=criterion, labels=labels)   # accumulates over steps
    out["grads2"] = _grads(pipe)
    pipe.zero_grad()
    with torch.no_grad():
        out["eval_loss"], out["eval_outputs"] = pipe.step(*inputs, num_chunks=m, criterion=criterion,
                                                          labels=labels, return_outputs=True)
    out["eval_grads"] = _grads(pipe)
    if variant == "dualpipe":   # the default, DeepSeek's behaviour: the copies' gradients left unreduced
        raw = DualPipe([copy.deepcopy(full[s]) for s in _stage_ids(variant, pp, rank)])
        raw.step(*inputs, num_chunks=m, criterion=criterion, labels=labels)
        out["raw_grads"] = _grads(raw)
    return out


def _close(a, b, atol=1e-12):
    return a is not None and b is not None and torch.allclose(a, b, rtol=0, atol=atol)


CASES = [("dualpipe", 2, 6), ("dualpipe", 4, 10), ("dualpipev", 2, 5), ("dualpipev", 4, 10)]


@pytest.mark.parametrize("variant,pp,m", CASES)
def test_step_matches_sequential(variant, pp, m):
    # `pp` is run_distributed's own keyword (megatron's parallel_state): the pipeline size goes as n_ranks
    results = run_distributed(_rank, pp, variant=variant, n_ranks=pp, m=m)
    ref_loss, ref_out, ref_grads = _reference(variant, pp, m)
    half = m // 2
    for r, res in enumerate(results):
        # who gets what back (DeepSeek's contract)
        if variant == "dualpipe" and r in (0, pp - 1):
            sl = slice(half, m) if r == 0 else slice(0, half)
            want_loss, want_out = ref_loss[sl], ref_out[sl.start * MBS:sl.stop * MBS]
        elif variant == "dualpipev" and r == 0:
            want_loss, want_out = ref_loss, ref_out
        else:
            want_loss = want_out = None
        for key_l, key_o in (("loss", "outputs"), ("eval_loss", "eval_outputs")):
            if want_loss is None:
                assert res[key_l] is None and res[key_o] is None, (r, key_l)
            else:
                assert torch.equal(res[key_l], want_loss), (r, key_l, res[key_l], want_loss)
                assert torch.equal(res[key_o], want_out), (r, key_o)
        for c, s in enumerate(_stage_ids(variant, pp, r)):
            for i, want in enumerate(ref_grads[s]):
                # DualPipe: after ReduceMirrorGrads each copy holds the sum over both directions
                assert _close(res["grads"][c][i], want), (r, c, s, i, (res["grads"][c][i] - want).abs().max())
                if variant == "dualpipev":   # one copy, micro-batches accumulated in the reference's order
                    assert torch.equal(res["grads"][c][i], want), (r, c, s, i)
                assert _close(res["grads2"][c][i], 2 * want, 2e-12), (r, c, s, i)
                assert res["eval_grads"][c][i] is None
        if variant == "dualpipe":
            mirror = results[pp - 1 - r]
            for c in range(2):
                for a, b in zip(res["grads"][c], mirror["grads"][1 - c]):
                    assert torch.equal(a, b)                   # the two copies stay bit-identical
            for c, s in enumerate(_stage_ids(variant, pp, r)):
                for i, want in enumerate(ref_grads[s]):
                    raw, raw_m = res["raw_grads"][c][i], mirror["raw_grads"][1 - c][i]
                    # unreduced, one copy alone is wrong (the guard that the check above can fail) ...
                    assert not _close(raw, want), (r, c, i)
                    # ... and the two copies sum to the reference (what DeepSeek's example checks)
                    assert _close(raw + raw_m, want), (r, c, i)


@pytest.mark.parametrize("variant,pp,m", [("dualpipev", 2, 4)])
def test_missing_weight_gradient_is_refused(variant, pp, m):
    results = run_distributed(_rank, pp, variant=variant, n_ranks=pp, m=m, drop_w=True)
    assert any(r is not None and "W never run" in r for r in results), results


def test_single_rank_dualpipev_and_per_instance_p2p_settings():
    """PP = 1: both chunks on one rank, the turn passes activations and gradients locally. P2P shapes/dtype are per
    instance: the module functions only set defaults copied at construction."""
    import megatron_dsv3.pipeline.dualpipe as dp
    from megatron_dsv3.testing import single_process
    m = 3
    ref_loss, ref_out, ref_grads = _reference("dualpipev", 1, m)
    x, lab = _data(m)
    saved = dict(dp._compat_defaults)
    with single_process():
        try:
            full = _full_model(2)
            with pytest.raises(ValueError, match="set_p2p_tensor_shapes"):
                dp.DualPipeV([full[0], full[1]]).step(x, num_chunks=m, criterion=criterion, labels=(lab,))
            dp.set_p2p_tensor_shapes([(5, 5)])
            dp.set_p2p_tensor_dtype(torch.float32)
            other = dp.DualPipeV([copy.deepcopy(full[0]), copy.deepcopy(full[1])])
            pipe = dp.DualPipeV([full[0], full[1]], p2p_tensor_shapes=[(MBS, WIDTH)], p2p_tensor_dtype=torch.float64)
            dp.set_p2p_tensor_shapes([(7, 7)])                 # after construction: no effect on either
            assert pipe._engine.shapes == [(MBS, WIDTH)] and other._engine.shapes == [(5, 5)]
            assert other._engine.dtype == torch.float32
            loss, out = pipe.step(x, num_chunks=m, criterion=criterion, labels=(lab,), return_outputs=True)
        finally:
            dp._compat_defaults.update(saved)
    assert torch.equal(loss, ref_loss) and torch.equal(out, ref_out)
    for c, s in enumerate((0, 1)):
        for p, want in zip(pipe.module[c].parameters(), ref_grads[s]):
            assert torch.equal(p.grad, want)
