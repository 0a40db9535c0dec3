"""megatron_dsv3/pipeline/megatron_schedule.py: DualPipe and DualPipeV as megatron-core forward_backward_funcs, with
the tiny DeepSeek-V3 preset as the stages (MLA, dense + DeepSeekMoE layers; the head and MTP on the last stage,
MTP using the first stage's embedding on the same rank), against megatron-core's own no-pipelining schedule on the
whole model in one process (the reference: the same forward_step_func, micro-batches one after the other).

Tolerances (float64). Per-micro-batch loss reports: bit-equal (each micro-batch runs the same ops on the same
rows; P2P moves bytes). Gradients: 1e-12 absolute: DualPipeV accumulates a stage's micro-batches in another order
than the reference (the deferred W's), DualPipe sums two partial sums (each copy's direction), then the copies are
added. DualPipe's two copies of a stage end bit-identical, and so do their routers' token counts.
"""
import functools

import torch

from megatron_dsv3.testing import run_distributed

S, B, SEED = 16, 2, 7


def _cfg(variant, pp, layers, ep=1, recompute_norms=False):
    from megatron_dsv3.config import DSV3Config
    # recompute_norms as dsv3-671b: with MLA's latent norms and up-projections recomputed too
    return DSV3Config.from_preset("tiny", num_layers=layers, params_dtype="float64", seq_length=S,
                                  recompute_norms=recompute_norms, mla={"recompute_up_proj": recompute_norms},
                                  parallel={"pipeline_model_parallel_size": pp, "pipeline_schedule": variant,
                                            "expert_model_parallel_size": ep})


def _batches(m, vocab):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, vocab, (B, S), generator=g)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "position_ids": torch.arange(S).repeat(B, 1),
                    "loss_mask": (torch.rand(B, S, generator=g) > 0.2).double()})
    return out


def _global_name(chunk, name):
    """decoder.layers.<local>.x -> decoder.layers.<global>.x (layer_number is global)."""
    if name.startswith("decoder.layers."):
        i, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{chunk.decoder.layers[int(i)].layer_number - 1}.{rest}"
    return name


def _state(chunks):
    from megatron_dsv3.moe.router import routers_of
    grads, counts = {}, {}
    for c, chunk in enumerate(chunks):
        for n, p in chunk.named_parameters():
            grads[(c, _global_name(chunk, n))] = p.grad.clone()
        for _, r in routers_of([chunk]):
            counts[(c, r.layer_number)] = r.tokens_per_expert.clone()
    return grads, counts


def _log_interleaving(log):
    """Wraps overlap.run_interleaved (which dualpipe.py's FB calls): each FB pair's steps, one per all-to-all a side
    posts, as a string of 'F' and 'B' appended to log. Returns the original, to restore."""
    import megatron_dsv3.pipeline.overlap as ov
    real = ov.run_interleaved

    def run(forward, backward, order="figure4"):
        steps = []

        def tag(gen, side):
            for _ in gen:
                steps.append(side)
                yield
        real(None if forward is None else tag(forward, "F"), None if backward is None else tag(backward, "B"), order)
        log.append("".join(steps))
    ov.run_interleaved = run
    return real


def _rank(rank, cases, overlaps=(True,), recompute_norms=False):
    import megatron_dsv3.pipeline.overlap as ov
    from megatron_dsv3.model import build_model
    from megatron_dsv3.pipeline.megatron_schedule import build_chunks, get_forward_backward_func, norm_recompute_layers
    from megatron_dsv3.pipeline.schedule import FB, build_schedule
    from megatron_dsv3.training.loop import forward_step
    out = {}
    log = []
    real = _log_interleaving(log)
    deferred = []                                  # per W of a split B: the segments it ran (0: a whole B's no-op)
    real_weight = ov.ChunkRun.weight

    def weight(self, params):
        deferred.append(len(self._deferred))
        return real_weight(self, params)
    ov.ChunkRun.weight = weight
    try:
        for variant, pp, layers, m in cases:
            for overlap in overlaps:
                cfg = _cfg(variant, pp, layers, recompute_norms=recompute_norms)
                chunks = build_chunks(cfg, lambda **kw: build_model(cfg, device="cpu", seed=SEED, **kw), rank)
                fb = get_forward_backward_func(variant)
                kw = dict(forward_step_func=forward_step, model=chunks, num_microbatches=m, seq_length=S,
                          micro_batch_size=B, overlap=overlap)
                log.clear()
                deferred.clear()
                losses = fb(data_iterator=iter(_batches(m, cfg.vocab_size)), **kw)
                pairs, split_ws = list(log), list(deferred)
                grads, counts = _state(chunks)
                for c in chunks:
                    c.zero_grad()
                with torch.no_grad():
                    evals = fb(data_iterator=iter(_batches(m, cfg.vocab_size)), forward_only=True, **kw)
                supports = [c.supports_overlap() for c in chunks]
                fbs = [op for op in build_schedule(variant, rank, pp, m) if isinstance(op, FB)]
                out[(variant, pp, overlap)] = {
                    "losses": losses, "grads": grads, "counts": counts, "evals": evals,
                    "stages": [c.placement.stage for c in chunks],
                    "no_grad_in_eval": all(p.grad is None for c in chunks for p in c.parameters()),
                    "pairs": pairs, "supports": supports, "split_ws": split_ws,
                    "recomputing": [norm_recompute_layers(c) for c in chunks],
                    "fb_recorded": sum(supports[op.f_chunk] or supports[op.b_chunk] for op in fbs)}
    finally:
        ov.run_interleaved = real
        ov.ChunkRun.weight = real_weight
    return out


def _check_interleaved(r, overlap):
    """With overlap, every FB pair with a recorded side ran through run_interleaved, in Figure 4's order: the
    backward's first all-to-all, then the forward's, alternately while both sides post (an F step between two B
    steps: the forward computed while the backward's all-to-all was in flight); whether a pair had two
    all-to-alls on each side (returned, checked over the ranks). Without, no pair was interleaved."""
    if not overlap:
        assert r["pairs"] == [], r["pairs"]
        return True
    assert len(r["pairs"]) == r["fb_recorded"] > 0, (len(r["pairs"]), r["fb_recorded"])
    for steps in r["pairs"]:
        k = min(steps.count("F"), steps.count("B"))
        assert steps[:2 * k] == "BF" * k, steps
    return any(min(p.count("F"), p.count("B")) >= 2 for p in r["pairs"])


@functools.lru_cache(maxsize=None)
def _reference(layers, m):
    """megatron-core's forward_backward_no_pipelining on the whole model, one process."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.router import routers_of
    from megatron_dsv3.testing import single_process
    from megatron_dsv3.training.loop import forward_step
    with single_process():
        cfg = _cfg("1f1b", 1, layers)
        model = build_model(cfg, device="cpu", seed=SEED)
        losses = forward_backward_no_pipelining(
            forward_step_func=forward_step, data_iterator=iter(_batches(m, cfg.vocab_size)), model=[model],
            num_microbatches=m, seq_length=S, micro_batch_size=B)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        counts = {r.layer_number: r.tokens_per_expert.clone() for _, r in routers_of([model])}
    return losses, grads, counts


def _check(results, variant, pp, layers, m, overlap=True):
    ref_losses, ref_grads, ref_counts = _reference(layers, m)
    seen = set()
    got_losses = {}
    two_each = []
    for rank, res in enumerate(results):
        r = res[(variant, pp, overlap)]
        two_each.append(_check_interleaved(r, overlap))
        assert r["no_grad_in_eval"]
        # who holds which micro-batches' loss reports
        if variant == "dualpipev":
            want = range(m) if rank == 0 else range(0)
        else:
            want = range(m // 2, m) if rank == 0 else range(0, m // 2) if rank == pp - 1 else range(0)
        assert len(r["losses"]) == len(want) and len(r["evals"]) == len(want), (rank, len(r["losses"]))
        for g, got, ev in zip(want, r["losses"], r["evals"]):
            assert torch.equal(got["lm loss"], ref_losses[g]["lm loss"]), (rank, g, got, ref_losses[g])
            assert torch.equal(ev["lm loss"], ref_losses[g]["lm loss"]), (rank, g)
            got_losses[g] = got
        for (c, name), grad in r["grads"].items():
            want_g = ref_grads[name]
            err = float((grad - want_g).abs().max())
            assert err <= 1e-12, (variant, pp, rank, c, name, err)
            seen.add(name)
        for (c, layer), cnt in r["counts"].items():
            assert torch.equal(cnt, ref_counts[layer]), (variant, rank, c, layer)
    assert any(two_each), [res[(variant, pp, overlap)]["pairs"] for res in results]
    assert sorted(got_losses) == list(range(m))
    assert seen == set(ref_grads), set(ref_grads) ^ seen           # every parameter is somewhere, once named
    if variant == "dualpipe":                                        # the mirrored copies are bit-identical
        for rank, res in enumerate(results):
            mine, mirror = res[(variant, pp, overlap)]["grads"], results[pp - 1 - rank][(variant, pp, overlap)]["grads"]
            for (c, name), g in mine.items():
                assert torch.equal(g, mirror[(1 - c, name)]), (rank, c, name)
    # guard: the gradients are not trivially equal to anything (a zero gradient would pass a sloppy check)
    assert all(float(g.abs().max()) > 0 for n, g in ref_grads.items() if "expert_bias" not in n)


def test_pp2_both_variants_match_no_pipelining():
    """With the overlapped FB pairs (the default) and without: both equal the reference. DualPipeV: 4 stages of one
    layer (dense, MoE, MoE, MoE + head + MTP): rank 0's chunk 0 (the dense layer) has no sub-stages, so its pairs
    with a recorded other side interleave only that side; DualPipe: 2 stages of two layers."""
    cases = [("dualpipev", 2, 4, 4), ("dualpipe", 2, 4, 4)]
    results = run_distributed(_rank, 2, pp=2, cases=cases, overlaps=(True, False), timeout=240)
    assert results[0][("dualpipev", 2, True)]["stages"] == [0, 3]
    assert results[1][("dualpipev", 2, True)]["stages"] == [1, 2]
    assert results[0][("dualpipe", 2, True)]["stages"] == [0, 1]
    assert results[1][("dualpipe", 2, True)]["stages"] == [1, 0]
    assert results[0][("dualpipev", 2, True)]["supports"] == [False, True]     # the mixed case
    assert all(r[("dualpipe", 2, True)]["supports"] == [True, True] for r in results)
    for variant, pp, layers, m in cases:
        for overlap in (True, False):
            _check(results, variant, pp, layers, m, overlap)


def test_pp4_both_variants_match_no_pipelining():
    # DualPipeV: 8 stages of one layer; DualPipe: 4 stages of two, stage s on ranks s and 3-s (overlap on)
    cases = [("dualpipev", 4, 8, 8), ("dualpipe", 4, 8, 8)]
    results = run_distributed(_rank, 4, pp=4, cases=cases, timeout=300)
    assert [r[("dualpipev", 4, True)]["stages"] for r in results] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [r[("dualpipe", 4, True)]["stages"] for r in results] == [[0, 3], [1, 2], [2, 1], [3, 0]]
    for variant, pp, layers, m in cases:
        _check(results, variant, pp, layers, m)


def _ep_rank(rank, layers, m):
    """DualPipeV PP = 2 with EP = 2 inside each stage (4 ranks: DP = 2, the EP group is a stage's DP pair): data rank
    d trains micro-batches d*m .. d*m+m-1 of the reference's 2m, with the overlap and without."""
    import megatron_dsv3.pipeline.overlap as ov
    from megatron.core import parallel_state as ps
    from megatron_dsv3.model import build_model
    from megatron_dsv3.pipeline.megatron_schedule import build_chunks, get_forward_backward_func
    from megatron_dsv3.pipeline.schedule import FB, build_schedule
    from megatron_dsv3.training.loop import forward_step
    pp_rank, d = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()
    cfg = _cfg("dualpipev", 2, layers, ep=2)
    out = {"pp": pp_rank, "d": d, "ep": ps.get_expert_model_parallel_rank(),
           "ep_size": ps.get_expert_model_parallel_world_size()}
    log = []
    real = _log_interleaving(log)
    try:
        for overlap in (True, False):
            chunks = build_chunks(cfg, lambda **kw: build_model(cfg, device="cpu", seed=SEED, **kw), pp_rank)
            log.clear()
            losses = get_forward_backward_func("dualpipev")(
                forward_step_func=forward_step, data_iterator=iter(_batches(2 * m, cfg.vocab_size)[d * m:(d + 1) * m]),
                model=chunks, num_microbatches=m, seq_length=S, micro_batch_size=B, overlap=overlap)
            grads, counts = _state(chunks)
            supports = [c.supports_overlap() for c in chunks]
            fbs = [op for op in build_schedule("dualpipev", pp_rank, 2, m) if isinstance(op, FB)]
            out[overlap] = {"losses": losses, "grads": grads, "counts": counts, "pairs": list(log),
                            "fb_recorded": sum(supports[op.f_chunk] or supports[op.b_chunk] for op in fbs)}
    finally:
        ov.run_interleaved = real
    return out


def test_dualpipev_pp2_ep2_overlap_matches_reference():
    """DualPipeV PP = 2 x EP = 2 (the all-to-alls cross ranks inside each stage), overlap on and off, against the
    no-pipelining reference over all 2m micro-batches in one process (EP = 1). Each data rank divides its loss by
    m, the reference by 2m (exact factor 2): a replicated parameter's gradient summed over the two data ranks, and
    an expert's gradient on the EP rank holding it, are twice the reference's. Tolerances (float64): loss reports
    1e-12 relative (EP changes the order in which an expert's rows are summed back into tokens), gradients 1e-12
    absolute; token counts summed over the data ranks exact."""
    layers, m = 4, 4
    results = run_distributed(_ep_rank, 4, pp=2, ep=2, layers=layers, m=m, timeout=240)
    ref_losses, ref_grads, ref_counts = _reference(layers, 2 * m)
    assert sorted((r["pp"], r["d"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["ep_size"] == 2 and r["ep"] == r["d"] for r in results)
    n_local = None
    for overlap in (True, False):
        two_each = [_check_interleaved(r[overlap], overlap) for r in results]
        assert any(two_each), [r[overlap]["pairs"] for r in results]
        for r in results:
            want = range(r["d"] * m, (r["d"] + 1) * m) if r["pp"] == 0 else range(0)
            got = r[overlap]["losses"]
            assert len(got) == len(want)
            for g, rep in zip(want, got):
                torch.testing.assert_close(rep["lm loss"], ref_losses[g]["lm loss"], rtol=1e-12, atol=0)
        seen = set()
        for pp_rank in (0, 1):
            pair = [r[overlap] for r in results if r["pp"] == pp_rank]
            ep_ranks = [r["ep"] for r in results if r["pp"] == pp_rank]
            for key in pair[0]["grads"]:
                c, name = key
                if ".mlp.experts.weight" in name:         # this EP rank's experts: a slice of the reference's
                    for r, e in zip(pair, ep_ranks):
                        n_local = r["grads"][key].shape[0]
                        want_g = 2 * ref_grads[name][e * n_local:(e + 1) * n_local]
                        err = float((r["grads"][key] - want_g).abs().max())
                        assert err <= 1e-12, (overlap, pp_rank, e, name, err)
                else:
                    err = float((pair[0]["grads"][key] + pair[1]["grads"][key] - 2 * ref_grads[name]).abs().max())
                    assert err <= 1e-12, (overlap, pp_rank, name, err)
                seen.add(name)
            for key, cnt in pair[0]["counts"].items():
                assert torch.equal(cnt + pair[1]["counts"][key], ref_counts[key[1]]), (overlap, key)
        assert seen == set(ref_grads), set(ref_grads) ^ seen
    assert n_local == 4                                    # 8 experts, 4 on each EP rank


def test_capture_keeps_forward_step_contract():
    """_Capture (how the overlapped forward keeps megatron's forward_step_func contract): the trainer's
    forward_step reads its batch and calls the model once; the model's forward only records the call and returns
    an empty placeholder; the class's forward is back afterwards; a wrapper's dtype cast of the placeholder
    (Float16Module's float32 on the last stage) is repeated on the real output, no cast without one; a
    forward_step_func that never calls the model is an error."""
    import pytest
    from megatron_dsv3.model import build_model
    from megatron_dsv3.pipeline.megatron_schedule import _Capture
    from megatron_dsv3.testing import single_process
    from megatron_dsv3.training.loop import forward_step

    class ToFloat32(torch.nn.Module):        # what Float16Module does to a last stage's output
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs).float()

    with single_process():
        cfg = _cfg("1f1b", 1, 3)
        m = build_model(cfg, device="cpu", seed=SEED)
        batch = _batches(1, cfg.vocab_size)[0]
        with _Capture(m) as cap:
            out, loss_func = forward_step(iter([batch]), m)
        assert "forward" not in m.__dict__
        assert out.numel() == 0 and out.dtype == torch.float64
        assert cap.args[0] is batch["tokens"] and cap.kwargs["labels"] is batch["labels"]
        real = m(*cap.args, **cap.kwargs)
        assert cap.like_returned(real, out) is real
        with _Capture(m) as cap:
            out, _ = forward_step(iter([batch]), ToFloat32(m))
        assert out.dtype == torch.float32 and cap.like_returned(real, out).dtype == torch.float32
        with pytest.raises(RuntimeError, match="did not call the model"):
            with _Capture(m):
                pass
        assert "forward" not in m.__dict__


def test_recompute_norms_split_and_overlapped_match_no_pipelining():
    """--recompute-norms (on in dsv3-671b, here with MLA's up-projection recompute as there): megatron-core's
    CheckpointWithoutOutput refuses the split B's autograd.grad, so overlap.py recomputes the norms of the layers
    it runs as pieces its own way. Both variants
    at PP 2: every chunk has layers recomputing norms; the FB pairs interleave (Figure 4's order, as without
    recompute); chunks run as pieces defer their W (split B; DualPipe's stage 0 holds the dense layer too, as a
    whole-layer piece); losses bit-equal to the no-pipelining reference without recompute (the norms are
    recomputed by the same call), gradients 1e-12. DualPipeV's rank 0 chunk 0 (the dense layer alone, no
    pieces) still runs megatron-core's recompute, its B whole."""
    cases = [("dualpipev", 2, 4, 4), ("dualpipe", 2, 4, 4)]
    results = run_distributed(_rank, 2, pp=2, cases=cases, recompute_norms=True, timeout=300)
    for variant, pp, layers, m in cases:
        for res in results:
            r = res[(variant, pp, True)]
            assert all(n > 0 for n in r["recomputing"]), r["recomputing"]
        # a split B's W ran segments: rank 1's chunks (stages 1 and 2 / 1 and 0) are recorded and not last
        assert any(n > 0 for n in results[1][(variant, pp, True)]["split_ws"]), variant
        _check(results, variant, pp, layers, m)
