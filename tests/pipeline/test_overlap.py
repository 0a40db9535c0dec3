"""megatron_dsv3/pipeline/overlap.py: Figure 4's overlapped forward & backward against the plain F then B.

Reference: the layers' own forward (megatron-core's TransformerLayer.forward -> DeepSeekMoE.forward) and one
`backward()`, which knows nothing of sub-stages. Tolerance 1e-12 absolute in float64 (STYLE.md): the segmented
backward sums a tensor's gradient contributions (a residual used twice, the gates) in another association.
"""
import pytest
import torch

from megatron_dsv3.testing import run_distributed


def test_pending_cut_splits_backward_at_the_post():
    """Pending.cut: what follows wait() and what precedes the post back-propagate separately and compose to the
    uncut gradient (EP = 1: no communication; the EP = 2 path is exercised by the layer tests below)."""
    from megatron_dsv3.moe.dispatch import dispatch, plan_dispatch
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    plan = plan_dispatch(torch.tensor([[1, 0], [0, 2], [2, 1], [1, 2]]), 3)
    g = torch.randn(8, 3, dtype=torch.float64)
    p = dispatch(x * 2, plan, torch.rand(4, 2), async_op=True)
    in_flight, leaf = p.cut()
    assert leaf.is_leaf and leaf.requires_grad and not in_flight.is_leaf
    y = p.wait().x * 3
    y.backward(g)
    assert x.grad is None and leaf.grad is not None          # stopped at the cut
    torch.autograd.backward(in_flight, leaf.grad)
    expected = torch.zeros_like(x).index_add_(0, plan.token_of_row, 6 * g)     # rows sorted by expert -> tokens
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-15)


H, S, BATCH = 32, 6, 2


def _stack(ep: int, seed: int = 0, recompute_norms: bool = False):
    """[dense, MoE, MoE] DeepSeek-V3 layers (tiny, float64), the same seeded weights on every rank (each EP rank
    holds its own slice of the experts, here filled with the same draws). recompute_norms: megatron-core's
    selective norm recompute flags on every layer (DSV3Config.recompute_norms)."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.pipeline.overlap import LayerStack
    from megatron_dsv3.specs import get_layer_spec
    cfg = DSV3Config.from_preset("tiny", hidden_size=H, recompute_norms=recompute_norms, moe=dict(
        num_experts=8, top_k=3, n_group=4, topk_group=2, num_shared_experts=1, expert_ffn_hidden_size=16,
        seq_aux_loss_coeff=1e-2), parallel=dict(expert_model_parallel_size=ep))
    tc = cfg.to_transformer_config()
    torch.manual_seed(seed)
    stack = LayerStack([build_module(get_layer_spec(cfg, moe_layer=i > 0), config=tc, layer_number=i + 1)
                        for i in range(3)]).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "router" in name else 0.1)
                    + (1.0 if "layernorm" in name else 0.0))
        for layer in stack.layers[1:]:
            layer.mlp.router.expert_bias.copy_(torch.randn(8, generator=g) * 0.1)
    return stack


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _pair(rank, orders):
    """On each EP rank: micro-batch B's forward, then the pair (A's forward, B's backward), then A's backward,
    plain (reference) and overlapped in each order. Returns the largest differences."""
    import torch.distributed as dist
    from megatron_dsv3.pipeline.overlap import ChunkRun, overlap_pieces, run_interleaved

    gen = torch.Generator().manual_seed(10 + rank)               # different tokens on the two EP ranks
    xA, xB, gA, gB = (torch.randn(S, BATCH, H, generator=gen, dtype=torch.float64) for _ in range(4))

    ref = _stack(ep=2)                                            # the reference: the layers' own forward
    rA, rB = xA.clone().requires_grad_(), xB.clone().requires_grad_()
    oB = ref(rB)
    oA = ref(rA)
    oB.backward(gB)
    after_pair = _grads(ref)
    oA.backward(gA)
    total = _grads(ref)

    def diff(a, b):
        return float((a - b).abs().max())

    out = {}
    for order in orders:
        for split_w in (False, True):
            m = _stack(ep=2)
            pieces = overlap_pieces(m)
            assert [type(p).__name__ for p in pieces] == ["_Whole", "DSV3LayerStages", "DSV3LayerStages"]
            a, b = xA.clone().requires_grad_(), xB.clone().requires_grad_()
            run_b = ChunkRun(pieces, [b])
            run_b.run_forward()
            run_a = ChunkRun(pieces, [a])
            run_interleaved(run_a.forward(), run_b.backward(run_b.outputs, [gB]), order)
            pair = _grads(m)
            run_a.run_backward(run_a.outputs, [gA], split_w=split_w)
            if split_w:
                assert _grads(m).keys() == pair.keys() and all(torch.equal(_grads(m)[k], pair[k]) for k in pair)
                run_a.weight(list(m.parameters()))
            got = _grads(m)
            out[(order, split_w)] = {
                "outputs": max(diff(run_a.outputs[0], oA), diff(run_b.outputs[0], oB)),
                "dx": max(diff(b.grad, rB.grad), diff(a.grad, rA.grad)),
                "pair_grads": max(diff(pair[k], after_pair[k]) for k in after_pair),
                "grads": max(diff(got[k], total[k]) for k in total),
                "same_keys": pair.keys() == after_pair.keys() and got.keys() == total.keys(),
                "bias_counts": [float(l.mlp.router.tokens_per_expert.sum()) for l in m.layers[1:]],
            }
    out["ref_counts"] = [float(l.mlp.router.tokens_per_expert.sum()) for l in ref.layers[1:]]
    out["ep"] = dist.get_world_size()
    return out


def test_overlapped_pair_equals_f_then_b_ep2():
    """Tiny DeepSeek-V3 layers, EP = 2 (the all-to-alls cross ranks): the pair run in Figure 4's order, forward
    first, and one after the other (handles waited in different orders relative to the other micro-batch's
    work) gives the reference's outputs and gradients; so do the deferred weight gradients (split_w + weight())."""
    orders = ("figure4", "forward_first", "sequential")
    results = run_distributed(_pair, 2, ep=2, orders=orders)
    for res in results:
        assert res["ep"] == 2
        for order in orders:
            for split_w in (False, True):
                r = res[(order, split_w)]
                assert r["same_keys"], (order, split_w)
                for key in ("outputs", "dx", "pair_grads", "grads"):
                    assert r[key] <= 1e-12, (order, split_w, key, r[key])
                assert r["bias_counts"] == res["ref_counts"]      # tokens counted once per forward


def test_pieces_of_plain_layers_fall_back():
    """A chunk without MoE layers has no sub-stages (dualpipe.py then runs F then B); plain modules neither."""
    import torch.nn as nn
    from megatron_dsv3.pipeline.overlap import LayerStack, overlap_pieces, run_interleaved
    assert overlap_pieces(nn.Linear(2, 2)) is None
    assert overlap_pieces(LayerStack([nn.Linear(2, 2), nn.Tanh()])) is None
    with pytest.raises(ValueError, match="order"):
        run_interleaved(None, None, "backward_last")


M = 4


def _criterion(out, target):
    return ((out - target) ** 2).mean()


def _dualpipev(rank):
    """DualPipeV at PP = 1 (both chunks on the rank, the V turns locally) on each of 2 EP ranks: chunk 0 and chunk 1
    are [dense, MoE, MoE] stacks; the step with overlap (every FB interleaved), without, and the sequential
    reference (each micro-batch forward then backward through the plain modules)."""
    from megatron.core import parallel_state as ps
    import megatron_dsv3.pipeline.dualpipe as dp
    from megatron_dsv3.pipeline import DualPipeV
    gen = torch.Generator().manual_seed(20 + rank)
    x = torch.randn(S, BATCH * M, H, generator=gen, dtype=torch.float64)
    lab = torch.randn(S, BATCH * M, H, generator=gen, dtype=torch.float64)

    ref = [_stack(2, seed=0), _stack(2, seed=1)]
    losses = []
    for xm, lm in zip(x.tensor_split(M, dim=1), lab.tensor_split(M, dim=1)):
        loss = _criterion(ref[1](ref[0](xm)), lm)
        loss.backward()
        losses.append(loss.detach())
    ref_loss = torch.stack(losses)

    interleaved = []
    real = dp._overlap.run_interleaved

    def counting(f, b, order):
        interleaved.append(order)
        return real(f, b, order)
    dp._overlap.run_interleaved = counting
    out = {}
    try:
        for overlap in (True, False):
            interleaved.clear()
            chunks = [_stack(2, seed=0), _stack(2, seed=1)]
            pipe = DualPipeV(chunks, batch_dim=1, process_group=ps.get_pipeline_model_parallel_group(),
                             p2p_tensor_shapes=[(S, BATCH, H)], p2p_tensor_dtype=torch.float64, overlap=overlap)
            loss, _ = pipe.step(x, num_chunks=M, criterion=_criterion, labels=(lab,))
            fb = sum(isinstance(op, dp.FB) for op in pipe.schedule(M))
            out[overlap] = {
                "loss": float((loss - ref_loss).abs().max()),
                "grads": max(float((p.grad - q.grad).abs().max())
                             for c in (0, 1) for p, q in zip(chunks[c].parameters(), ref[c].parameters())),
                "interleaved": list(interleaved), "fb": fb,
            }
    finally:
        dp._overlap.run_interleaved = real
    return out


def test_dualpipev_step_with_overlap_equals_sequential_ep2():
    """DualPipe's FB ops through overlap.py (DualPipeV, PP = 1, EP = 2, tiny DeepSeek-V3 layers): losses and every
    gradient equal the sequential reference's (1e-12, float64) with and without the overlap, and with it every FB
    op was interleaved (B, B(split_w) and W of the recorded chunks ran segment by segment)."""
    for res in run_distributed(_dualpipev, 2, ep=2):
        for overlap in (True, False):
            r = res[overlap]
            assert r["loss"] <= 1e-12 and r["grads"] <= 1e-12, (overlap, r)
        assert res[True]["fb"] > 0 and res[True]["interleaved"] == ["figure4"] * res[True]["fb"]
        assert res[False]["interleaved"] == []


def _held_after_forward(run) -> int:
    """Bytes a ChunkRun's forward leaves allocated (what autograd and the cuts keep), from the profiler's CPU
    memory events: allocations minus frees while it ran."""
    import gc
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.run_forward()
        gc.collect()
    return sum(e.self_cpu_memory_usage for e in prof.events())


def test_recompute_norms_split_pieces_equal_unsplit_and_keep_no_norm_outputs():
    """Layers with megatron-core's norm recompute flags (DSV3Config.recompute_norms) run as pieces: overlap.py
    recomputes the norms itself, so the split backward (autograd.grad per segment, then W by backward(inputs=))
    runs, which megatron-core's CheckpointWithoutOutput refuses. Reference: the same weights without recompute, the
    layers' own forward, one backward. Outputs bit-equal (the same norm call), input and parameter gradients
    1e-12 (float64; segments sum in another association). Memory: the same pieces without recompute keep, per
    norm, at least its output [s, b, h] more (autograd's saved inputs of MLA, router and shared expert, and the
    pre-MLP norm output that crosses the cuts); the layers' flags and modules are restored."""
    from megatron_dsv3.pipeline.overlap import ChunkRun, overlap_pieces
    from megatron_dsv3.testing import single_process
    gen = torch.Generator().manual_seed(5)
    x, g = (torch.randn(S, BATCH, H, generator=gen, dtype=torch.float64) for _ in range(2))
    with single_process():
        ref = _stack(ep=1)
        rx = x.clone().requires_grad_()
        out = ref(rx)
        out.backward(g)
        ref_grads = _grads(ref)

        m = _stack(ep=1, recompute_norms=True)
        norms = [(type(l.input_layernorm), type(l.pre_mlp_layernorm)) for l in m.layers]
        assert all(l.recompute_input_layernorm and l.recompute_pre_mlp_layernorm for l in m.layers)
        for split_w in (True, False):
            m.zero_grad(set_to_none=True)
            pieces = overlap_pieces(m)
            assert [type(p).__name__ for p in pieces] == ["_Whole", "DSV3LayerStages", "DSV3LayerStages"]
            a = x.clone().requires_grad_()
            run = ChunkRun(pieces, [a])
            (y,) = run.run_forward()
            assert torch.equal(y, out.detach())
            run.run_backward([y], [g], split_w=split_w)
            if split_w:
                assert all(p.grad is None for p in m.parameters())       # B computed input gradients only
                run.weight(list(m.parameters()))
            assert float((a.grad - rx.grad).abs().max()) <= 1e-12
            got = _grads(m)
            assert got.keys() == ref_grads.keys()
            for k in ref_grads:
                assert float((got[k] - ref_grads[k]).abs().max()) <= 1e-12, (split_w, k)
        assert all(l.recompute_input_layernorm and l.recompute_pre_mlp_layernorm for l in m.layers)
        assert [(type(l.input_layernorm), type(l.pre_mlp_layernorm)) for l in m.layers] == norms

        kept_plain = _held_after_forward(ChunkRun(overlap_pieces(ref), [x.clone().requires_grad_()]))
        kept_recompute = _held_after_forward(ChunkRun(overlap_pieces(m), [x.clone().requires_grad_()]))
    norm_outputs = 2 * len(m.layers) * S * BATCH * H * x.element_size()
    assert kept_plain - kept_recompute >= norm_outputs, (kept_plain, kept_recompute, norm_outputs)


def test_recomputed_norm_saved_views_rebuilt():
    """overlap._NormRecompute: a consumer saving a view (transposed, offset) of a norm output gets the view
    rebuilt from the recomputed norm; the gradient equals the plain one; an in-place change of the norm's input
    between forward and backward is refused, not silently recomputed from the new values."""
    import torch.nn as nn
    from megatron_dsv3.norm import RMSNorm
    from megatron_dsv3.pipeline.overlap import _NormRecompute

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(hidden_size=6).double()
            self.recompute_input_layernorm = True

    gen = torch.Generator().manual_seed(1)
    layer, w = Layer(), torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    x0 = torch.randn(5, 6, generator=gen, dtype=torch.float64)

    def f(y):
        return (y.t()[1:5, 2:5] @ w.t()).sin().sum()          # mm saves a strided view at an offset (for w's grad)

    x = x0.clone().requires_grad_()
    f(layer.input_layernorm(x)).backward()
    want = (x.grad, layer.input_layernorm.weight.grad, w.grad)
    layer.input_layernorm.weight.grad = w.grad = None
    rec = _NormRecompute.of(layer)
    packed = []
    rec._pack = (lambda pack: lambda t: packed.append(pack(t)) or packed[-1])(rec._pack)
    x = x0.clone().requires_grad_()
    with rec.active():
        assert not layer.recompute_input_layernorm
        loss = f(layer.input_layernorm(x))
    assert layer.recompute_input_layernorm and isinstance(layer.input_layernorm, RMSNorm)
    assert sum(type(p).__name__ == "_Recipe" for p in packed) == 1
    loss.backward()
    got = (x.grad, layer.input_layernorm.weight.grad, w.grad)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    x = x0.clone()                                            # a non-leaf input, changed in place after forward
    with rec.active():
        xi = x * 1.0
        loss = f(layer.input_layernorm(xi))
    xi.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


class _Log(torch.autograd.Function):
    """Identity that appends `fwd` to the log in forward and `bwd` in backward."""

    @staticmethod
    def forward(ctx, x, log, fwd, bwd):
        log.append(fwd)
        ctx.log, ctx.bwd = log, bwd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append(ctx.bwd)
        return g, None, None, None


class _LogLayer:
    """LayerStages that only log: compute entries ("F attn f0"), posts and waits of the all-to-alls, both ways."""

    def __init__(self, name, log):
        self.n, self.log = name, log

    def _c(self, x, what):
        return _Log.apply(x, self.log, f"F {what} {self.n}", f"B {what} {self.n}")

    def attention(self, st):
        return {"tokens": self._c(st["hidden"] * 1.0, "attn")}

    def _comm(self, x, what):
        from megatron_dsv3.moe.dispatch import Pending
        sent = _Log.apply(x, self.log, f"F post {what} {self.n}", f"B wait {what} {self.n}")
        return Pending(sent.view_as(sent), then=lambda r: _Log.apply(r, self.log, f"F wait {what} {self.n}",
                                                                     f"B post {what} {self.n}"))

    def dispatch(self, st):
        return self._comm(st["tokens"], "dispatch")

    def mlp(self, st):
        return {"routed": self._c(st["dispatched"] * 2.0, "mlp")}

    def combine(self, st):
        return self._comm(st["routed"], "combine")

    def output(self, st):
        return st["combined"]


@pytest.mark.parametrize("order", ["figure4", "forward_first", "sequential"])
def test_figure4_order(order):
    """The pair's host order: with overlap every all-to-all (forward dispatch/combine of one micro-batch, backward
    combine/dispatch of the other) has a compute piece of the other micro-batch between its post and its wait, and
    the compute row reads as Figure 4's (ATTN F, MLP B, MLP F, ATTN B, ...); "sequential" has none."""
    from megatron_dsv3.pipeline.overlap import ChunkRun, run_interleaved
    log = []
    fwd_layers = [_LogLayer(f"f{i}", log) for i in range(2)]
    bwd_layers = [_LogLayer(f"b{i}", log) for i in range(2)]
    run_b = ChunkRun(bwd_layers, [torch.ones(4, 2, requires_grad=True)])
    run_b.run_forward()
    log.clear()
    run_a = ChunkRun(fwd_layers, [torch.ones(4, 2, requires_grad=True)])
    run_interleaved(run_a.forward(), run_b.backward(run_b.outputs, [torch.ones(4, 2)]), order)
    assert sorted(log) == sorted({f"{d} {w} {n}" for d, n in (("F", "f0"), ("F", "f1"), ("B", "b0"), ("B", "b1"))
                                  for w in ("attn", "mlp", "post dispatch", "wait dispatch", "post combine",
                                            "wait combine")})
    hidden = []
    for i, e in enumerate(log):
        side, what = e.split()[0], e.split()[1]
        if what == "post":
            j = log.index(e.replace("post", "wait"))
            hidden.append(any(x.split()[0] != side and x.split()[1] in ("attn", "mlp") for x in log[i + 1:j]))
    compute = [e for e in log if e.split()[1] in ("attn", "mlp")]
    if order == "sequential":
        assert not any(hidden)
    else:
        assert len(hidden) == 8 and sum(hidden) >= (8 if order == "figure4" else 6), (hidden, log)
    if order == "figure4":
        assert compute == ["F attn f0", "B mlp b1", "F mlp f0", "B attn b1", "F attn f1", "B mlp b0", "F mlp f1",
                           "B attn b0"], log


def test_model_overlap_pieces_equal_forward():
    """DSV3Model.overlap_pieces() (embedding, [dense, MoE, MoE] layers, final norm + MTP + head + loss) run segment
    by segment through ChunkRun equals DSV3Model.forward with position_ids that restart (as packed documents')
    and a block-diagonal causal mask. Loss: bit-equal (the same ops on the same tensors);
    gradients 1e-12 (float64; the segments sum a tensor's gradient contributions in another association). Guard:
    the mask and the positions each change the loss, so pieces that dropped either would fail."""
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.pipeline.overlap import ChunkRun
    from megatron_dsv3.testing import single_process
    s, b = 16, 2
    with single_process():
        cfg = DSV3Config.from_preset("tiny", params_dtype="float64", seq_length=s)
        m = build_model(cfg, device="cpu", seed=7)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        # rope is relative, so positions restarting where the mask splits would change nothing: they restart at 6,
        # the mask splits at 10
        pos = torch.cat([torch.arange(6), torch.arange(10)]).repeat(b, 1)
        doc = (torch.arange(s) >= 10).long()
        mask = ~((doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril())   # True = masked
        mask = mask.view(1, 1, s, s)
        kw = dict(labels=torch.roll(tokens, -1, 1), loss_mask=(torch.rand(b, s, generator=g) > 0.2).double())
        w = torch.rand(b, s, generator=g, dtype=torch.float64)

        ref = m(tokens, pos, mask, **kw)
        (ref * w).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        without = [m(tokens, None, mask, **kw).detach(), m(tokens, pos, None, **kw).detach()]   # each matters

        pieces = m.overlap_pieces(tokens, pos, mask, **kw)
        assert [type(p).__name__ for p in pieces] == ["function", "_Whole", "DSV3LayerStages", "DSV3LayerStages",
                                                      "function"]
        run = ChunkRun(pieces, [])
        (out,) = run.run_forward()
        run.run_backward([(out * w).sum()], [None])
    assert torch.equal(out, ref.detach())
    assert not any(torch.allclose(x, ref.detach(), rtol=1e-6, atol=0) for x in without)
    assert {n for n, p in m.named_parameters() if p.grad is not None} == set(ref_grads)
    for n, p in m.named_parameters():
        assert float((p.grad - ref_grads[n]).abs().max()) <= 1e-12, n


def test_model_overlap_pieces_refused():
    """What forward() cannot run as pieces: full-layer recompute (supports_overlap False), a given decoder_input,
    packed-sequence params; a stage without MoE layers has nothing to overlap."""
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.testing import single_process
    with single_process():
        cfg = DSV3Config.from_preset("tiny", params_dtype="float64", seq_length=8)
        m = build_model(cfg, device="cpu", seed=7)
        tokens = torch.zeros(1, 8, dtype=torch.long)
        assert m.supports_overlap() and m.overlap_pieces(tokens) is not None
        assert m.overlap_pieces(tokens, packed_seq_params=object()) is None
        assert m.overlap_pieces(tokens, decoder_input=torch.zeros(8, 1, cfg.hidden_size)) is None
        full = build_model(cfg, device="cpu", seed=7, transformer_config=cfg.to_transformer_config(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
        assert not full.supports_overlap() and full.overlap_pieces(tokens) is None
        dense = build_model(DSV3Config.from_preset("tiny", num_layers=1, params_dtype="float64", seq_length=8),
                            device="cpu", seed=7)
        assert not dense.supports_overlap()
