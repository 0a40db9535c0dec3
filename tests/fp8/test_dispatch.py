"""FP8 dispatch (fp8/dispatch.py): the tokens quantised before the MoE dispatch all-to-all and fed as they arrive to
the FP8 experts.

- The experts on FP8 rows against the float64 recipe of tests/fp8/test_experts.py run on the dequantised tokens
  (which is what the FP8 dispatch computes: the Wgrad copy of x is re-tiled from the FP8 copy), with tokens built
  so that this re-tiling changes dW1 visibly (small values beside an outlier in every 1x128 tile).
- DeepSeekMoE at EP = 1: the FP8-dispatch layer against the FP8 experts behind the BF16 dispatch: bit-identical
  output and gradients except dW1 (re-tiled, see the test).
- EP = 2 over gloo: equal to the EP = 1 FP8-dispatch layer over both ranks' tokens (float rounding); the bytes the
  dispatch all-to-all posts, FP8 against BF16; Pending.cut() as pipeline/overlap.py uses it.
"""
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from megatron_dsv3.config import DSV3Config, FP8Config
from megatron_dsv3.fp8.dispatch import FP8DispatchMoE, FP8Rows, payload_bytes_per_row
from megatron_dsv3.fp8.experts import FP8GroupedExperts, fp8_expert_mlp
from megatron_dsv3.fp8.quant import quantize_tiles
from megatron_dsv3.testing import run_distributed
from tests.fp8.test_experts import TOL, close, dq_tiles, reference

E, H, F, K = 8, 256, 16, 3


def _ghost_rows(x):
    return x.new_zeros(()).expand(x.shape).requires_grad_()


def test_experts_on_fp8_rows_against_float64():
    """rows (q, s) in, as the dispatch delivers them: the float64 recipe on deq(q, s). Every 1x128 tile has one
    outlier (1e5 x the rest), so the other values fall in e4m3's subnormal range of the tile's scale; re-tiling
    them in 128x1 columns (Wgrad: dW1's rows other than the outliers') from the FP8 copy keeps that loss, which
    the BF16 copy does not have: dW1 differs from today's path there, the rest is bit-identical (same Fprop
    operand, same Dgrad)."""
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([130, 0, 57, 200])
    N, h, f = int(counts.sum()), 256, 128
    x = torch.randn(N, h, generator=g) * 1e-5
    x[:, 5] = x[:, 200] = 1.0                                 # an outlier in each tile of each row
    small = torch.ones(h, dtype=torch.bool)
    small[[5, 200]] = False                                   # dW1 [E, h, 2f]: rows of the small columns of x
    w1, w2 = torch.randn(4, h, 2 * f, generator=g) * 0.05, torch.randn(4, f, h, generator=g) * 0.05
    dy = torch.randn(N, h, generator=g)
    q, s = quantize_tiles(x, pow2_scales=True)
    got, today = [], []
    for inp, out in ((lambda: (_ghost_rows(x), q, s), got), (lambda: x.clone().requires_grad_(), today)):
        xi, a, b = inp(), w1.clone().requires_grad_(), w2.clone().requires_grad_()
        y = fp8_expert_mlp(xi, counts, a, b)
        y.backward(dy)
        dx = xi[0].grad if isinstance(xi, tuple) else xi.grad
        out.extend([y, dx, a.grad, b.grad])
    ry, rdx, rdw1, rdw2, _ = reference(dq_tiles(x, pow2=True), counts, w1, w2, dy)
    for a, r in zip(got, (ry, rdx, rdw1, rdw2)):
        close(a, r)
    close(got[2][:, small], rdw1[:, small])
    for name, a, b in zip(("y", "dx", "dw2"), got[:2] + got[3:], today[:2] + today[3:]):
        assert torch.equal(a, b), name
    single = reference(x, counts, w1, w2, dy)[2][:, small]    # Wgrad from x itself: today's dW1
    close(today[2][:, small], single)
    err = (got[2][:, small].double() - single).abs().max() / single.abs().max()
    assert err > 0.1, float(err)


def _cfg(ep=1, dispatch_fp8=True):
    # the shared experts in BF16: an FP8 linear's Wgrad tiles 128 tokens, so the EP = 1 reference over both ranks'
    # tokens would tile them differently from each rank's half (nothing to do with the dispatch)
    return DSV3Config.from_preset("tiny", hidden_size=H, moe=dict(
        num_experts=E, top_k=K, n_group=4, topk_group=2, num_shared_experts=1, expert_ffn_hidden_size=F,
        routed_scaling_factor=2.5, seq_aux_loss_coeff=0.0),
        parallel=dict(expert_model_parallel_size=ep), fp8=dict(
            enabled=True, backend="native", dispatch_fp8=dispatch_fp8,
            bf16_modules=FP8Config().bf16_modules + ("shared_experts",)))


def _build(cfg, pg_collection=None):
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.specs import get_moe_spec
    return build_module(get_moe_spec(cfg), config=cfg.to_transformer_config(), pg_collection=pg_collection)


def _randomise(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if name == "router.weight" else 0.1)
        layer.router.expert_bias.normal_(0, 0.1)


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(g)
    return out.detach(), x.grad


def _grads(layer):
    return {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


def test_specs_and_config():
    from megatron_dsv3.moe.layer import DeepSeekMoE
    from megatron_dsv3.specs import get_moe_spec
    assert FP8Config().dispatch_fp8 is True                    # the paper's default
    with pytest.raises(ValueError, match=r"FP8Config.dispatch_fp8 must be a bool, got 'yes'"):
        FP8Config(dispatch_fp8="yes")
    assert get_moe_spec(_cfg()).module is FP8DispatchMoE
    assert get_moe_spec(_cfg(dispatch_fp8=False)).module is DeepSeekMoE
    kept = DSV3Config.from_preset("tiny", fp8=dict(enabled=True, backend="native",
                                                   bf16_modules=FP8Config().bf16_modules + ("experts",)))
    assert get_moe_spec(kept).module is DeepSeekMoE           # BF16 experts: BF16 dispatch
    assert get_moe_spec(DSV3Config.from_preset("tiny")).module is DeepSeekMoE


def test_fp8_dispatch_layer_at_ep1_as_fp8_experts(mcore_single):
    """Same weights, same tokens: FP8DispatchMoE against DeepSeekMoE + FP8GroupedExperts (BF16 dispatch).
    Bit-identical: output, input gradient, router, shared experts, dW2 (quantising rows before or after the row
    permutation gives the same bytes). dW1 re-tiles x from its FP8 copy: with power-of-2 scales the second e4m3
    rounding changes only values in e4m3's subnormal range of their tile, here a relative 1e-4 at most (the
    float64 check of that path is test_experts_on_fp8_rows_against_float64)."""
    from megatron_dsv3.moe.layer import DeepSeekMoE
    fp8 = _build(_cfg())
    _randomise(fp8)
    base = _build(_cfg(dispatch_fp8=False))
    base.load_state_dict(fp8.state_dict())
    assert type(fp8) is FP8DispatchMoE and type(base) is DeepSeekMoE and isinstance(base.experts, FP8GroupedExperts)
    torch.manual_seed(1)
    x, g = torch.randn(16, 4, H), torch.randn(16, 4, H)
    (out, dx), (out_b, dx_b) = _run(fp8, x, g), _run(base, x, g)
    assert torch.equal(out, out_b) and torch.equal(dx, dx_b)
    got, want = _grads(fp8), _grads(base)
    assert set(got) == set(want) and "experts.weight1" in got
    for name in want:
        if name == "experts.weight1":
            err = (got[name] - want[name]).abs().max() / want[name].abs().max()
            assert err <= 1e-4, float(err)
        else:
            assert torch.equal(got[name], want[name]), name


@contextmanager
def _counting_all_to_all():
    """Every all_to_all_single posted inside: (bytes of the input, dtype)."""
    log, post = [], dist.all_to_all_single

    def counted(output, input, *args, **kwargs):
        log.append((input.numel() * input.element_size(), input.dtype))
        return post(output, input, *args, **kwargs)
    dist.all_to_all_single = counted
    try:
        yield log
    finally:
        dist.all_to_all_single = post


def _ep2(rank):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron_dsv3.fp8.dispatch import fp8_dispatch
    from megatron_dsv3.moe.dispatch import dispatch

    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    me = singles[rank]
    ref = _build(_cfg(), ProcessGroupCollection(tp=me, ep=me, cp=me))     # EP = 1, all experts
    _randomise(ref)
    layer = _build(_cfg(ep=2))
    El = E // 2
    with torch.no_grad():
        for name, p in layer.named_parameters():
            full = dict(ref.named_parameters())[name]
            p.copy_(full[rank * El:(rank + 1) * El] if name.startswith("experts.") else full)
        layer.router.expert_bias.copy_(ref.router.expert_bias)
    torch.manual_seed(100)
    xs, gs = torch.randn(2, 6, 4, H), torch.randn(2, 6, 4, H)              # [rank, s, b, h]
    # EP = 1 over both ranks' tokens (their rows reach each expert in the same order as under EP = 2)
    out_ref, dx_ref = _run(ref, torch.cat(list(xs)), torch.cat(list(gs)))
    out, dx = _run(layer, xs[rank], gs[rank])
    grads, grads_ref = _grads(layer), _grads(ref)
    for name in ("router.weight", "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"):
        dist.all_reduce(grads[name])                                       # data-parallel parameters
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    res = {"out": rel(out, out_ref[6 * rank:6 * (rank + 1)]), "dx": rel(dx, dx_ref[6 * rank:6 * (rank + 1)])}
    for name, gr in grads_ref.items():
        res[name] = rel(grads[name], gr[rank * El:(rank + 1) * El] if name.startswith("experts.") else gr)

    # bytes posted by the dispatch all-to-all (forward) and its reverse (backward), BF16 tokens
    x2d, topk_idx, gates = (t.detach() for t in layer.route(xs[rank]))
    plan = layer.plan(topk_idx)
    x_bf16 = x2d.detach().bfloat16()
    sizes = {}
    for name, fn in (("bf16", dispatch), ("fp8", fp8_dispatch)):
        xi = x_bf16.clone().requires_grad_()
        with _counting_all_to_all() as fwd:
            rows = fn(xi, plan, gates.clone().requires_grad_())
        grad_rows = torch.ones(rows[0].shape, dtype=torch.bfloat16)
        with _counting_all_to_all() as bwd:
            rows[0].backward(grad_rows)
        sizes[name] = (fwd, bwd)
        if name == "fp8":
            res["ghost_stride"] = rows.rows.stride()
            res["fp8_dtypes"] = (rows.q.dtype, rows.scale.dtype, tuple(rows.q.shape), tuple(rows.scale.shape))
    res["sizes"], res["rows_sent"] = sizes, sum(plan.send_splits)

    # overlap (pipeline/overlap.py): cut between post and wait; the executor's leaves turn FP8Rows into a list
    gy = torch.randn(x2d.shape, generator=torch.Generator().manual_seed(rank))
    x_plain, g_plain = x2d.clone().requires_grad_(), gates.clone().requires_grad_()
    layer.combine(layer.compute_experts(layer.dispatch(x_plain, plan, g_plain), plan), plan).backward(gy)
    x_cut, g_cut = x2d.clone().requires_grad_(), gates.clone().requires_grad_()
    pending = layer.dispatch(x_cut, plan, g_cut, async_op=True)
    in_flight, leaf = pending.cut()
    got = pending.wait()
    rows = [got[0].detach().requires_grad_(), got[1], got[2], got[3].detach().requires_grad_()]   # ChunkRun._cut
    layer.combine(layer.compute_experts(rows, plan), plan).backward(gy)
    torch.autograd.backward([got[0], got[3]], [rows[0].grad, rows[3].grad])   # posts the reverse all-to-alls
    assert x_cut.grad is None and g_cut.grad is None
    torch.autograd.backward(in_flight, leaf.grad)                          # waits for them
    res["cut_equal"] = torch.equal(x_cut.grad, x_plain.grad) and torch.equal(g_cut.grad, g_plain.grad)
    res["gate_grad"] = float(g_plain.grad.abs().max())
    dist.barrier()
    return res


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) test; run with CUDA_VISIBLE_DEVICES=")
def test_fp8_dispatch_ep2_equals_ep1_and_halves_the_bytes():
    results = run_distributed(_ep2, 2, ep=2, timeout=120)
    per_row = payload_bytes_per_row(H)                         # 256 e4m3 + 2 float32 scales = 264 bytes
    for r, res in enumerate(results):
        # float32 activations here: the same FP8 products, summed in another order (BLAS blocking) at most
        for key in ("out", "dx", "router.weight", "experts.weight1", "experts.weight2",
                    "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"):
            assert res[key] < 1e-5, f"rank {r}: {key} relative error {res[key]:.2e}"
        assert res["ghost_stride"] == (0, 0)                   # the gradient's stand-in holds no activation
        assert res["fp8_dtypes"][:2] == (torch.float8_e4m3fn, torch.float32)
        (bf16_fwd, bf16_bwd), (fp8_fwd, fp8_bwd) = res["sizes"]["bf16"], res["sizes"]["fp8"]
        n = res["rows_sent"]
        gates = (n * 4, torch.float32)                         # the rows' gates beside them, and their gradient
        assert bf16_fwd == [(n * H * 2, torch.bfloat16), gates]
        assert fp8_fwd == [(n * per_row, torch.uint8), gates]  # one all-to-all: e4m3 bytes and scales together
        assert fp8_fwd[0][0] / bf16_fwd[0][0] == per_row / (2 * H) < 0.52
        assert fp8_bwd == bf16_bwd and fp8_bwd[0][1] == torch.bfloat16     # the gradient stays BF16
        m = fp8_bwd[0][0] // (2 * H)                           # rows received: their gradients go back
        assert fp8_bwd == [(m * H * 2, torch.bfloat16), (m * 4, torch.float32)]
        assert res["cut_equal"], f"rank {r}: Pending.cut() changed the input or gate gradient"
        assert res["gate_grad"] > 0


def test_cut_at_ep1():
    """EP = 1 (no all-to-all): Pending.cut() still finds a tensor in flight (the ghost), and the two halves of the
    backward compose to the uncut input gradient."""
    from megatron_dsv3.fp8.dispatch import fp8_dispatch
    from megatron_dsv3.moe.dispatch import combine, plan_dispatch
    g = torch.Generator().manual_seed(0)
    T, h, f, E_, k = 40, 256, 64, 4, 2
    x0, gy = torch.randn(T, h, generator=g), torch.randn(T, h, generator=g)
    idx = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g)
    w1, w2 = torch.randn(E_, h, 2 * f, generator=g) * 0.05, torch.randn(E_, f, h, generator=g) * 0.05
    plan = plan_dispatch(idx, E_)
    x, gt = x0.clone().requires_grad_(), gates.clone().requires_grad_()
    rows = fp8_dispatch(x, plan, gt)
    combine(fp8_expert_mlp(rows[:3], plan.local_counts, w1, w2, row_scale=rows.gates), plan).backward(gy)
    xc, gc = x0.clone().requires_grad_(), gates.clone().requires_grad_()
    pending = fp8_dispatch(xc, plan, gc, async_op=True)
    in_flight, leaf = pending.cut()
    got = pending.wait()
    rows = [got[0].detach().requires_grad_(), got[1], got[2]]
    combine(fp8_expert_mlp(rows, plan.local_counts, w1, w2, row_scale=got.gates), plan).backward(gy)
    assert xc.grad is None and gc.grad.abs().max() > 0      # the gates' path is not cut at EP = 1 (no comm)
    torch.autograd.backward(got[0], rows[0].grad)
    torch.autograd.backward(in_flight, leaf.grad)
    assert x.grad.abs().max() > 0 and torch.equal(xc.grad, x.grad) and torch.equal(gc.grad, gt.grad)


def _overlap_pair(rank):
    """pipeline/overlap.py's Figure 4 pair (A's forward against B's backward, all-to-alls cut between post and
    wait) over a DeepSeek-V3 layer with the FP8 dispatch, against the layer's own forward and one backward."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.pipeline.overlap import ChunkRun, LayerStack, overlap_pieces, run_interleaved
    from megatron_dsv3.specs import get_layer_spec

    def stack():
        cfg = _cfg(ep=2)
        m = LayerStack([build_module(get_layer_spec(cfg, moe_layer=True), config=cfg.to_transformer_config(),
                                     layer_number=1)])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "router" in name else 0.1)
                        + (1.0 if "layernorm" in name else 0.0))
        return m

    gen = torch.Generator().manual_seed(10 + rank)
    xA, xB, gA, gB = (torch.randn(4, 2, H, generator=gen) for _ in range(4))
    ref = stack()
    assert type(ref.layers[0].mlp) is FP8DispatchMoE
    rA, rB = xA.clone().requires_grad_(), xB.clone().requires_grad_()
    oB, oA = ref(rB), ref(rA)
    oB.backward(gB)
    oA.backward(gA)
    m = stack()
    pieces = overlap_pieces(m)
    a, b = xA.clone().requires_grad_(), xB.clone().requires_grad_()
    run_b = ChunkRun(pieces, [b])
    run_b.run_forward()
    run_a = ChunkRun(pieces, [a])
    run_interleaved(run_a.forward(), run_b.backward(run_b.outputs, [gB]), "figure4")
    run_a.run_backward(run_a.outputs, [gA])
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max())
    errs = {"pieces": [type(p).__name__ for p in pieces], "out": max(rel(run_a.outputs[0], oA), rel(run_b.outputs[0], oB)),
            "dx": max(rel(a.grad, rA.grad), rel(b.grad, rB.grad))}
    ref_grads = _grads(ref)
    errs["grads"] = max(rel(p.grad, ref_grads[n]) for n, p in m.named_parameters() if n in ref_grads)
    errs["same_keys"] = set(_grads(m)) == set(ref_grads)
    return errs


def test_fp8_dispatch_in_the_overlapped_pair_ep2():
    for res in run_distributed(_overlap_pair, 2, ep=2, timeout=120):
        assert res["pieces"] == ["DSV3LayerStages"] and res["same_keys"]
        # float32: the segmented backward sums a tensor's gradient contributions in another association
        for key in ("out", "dx", "grads"):
            assert res[key] <= 1e-5, (key, res[key])


def _nccl_ep2(rank, port, out):
    """EP = 2 over NCCL on two GPUs (Triton quantiser, cuBLAS block-scaled GEMMs, uint8 all-to-all) against
    EP = 1 on each rank over both ranks' tokens, through the seams: plan, fp8_dispatch, FP8 experts, combine."""
    from megatron_dsv3.fp8.dispatch import fp8_dispatch
    from megatron_dsv3.moe.dispatch import combine, plan_dispatch
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dev = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(0)
    E_, T, h, f, k = 8, 512, 1024, 256, 4
    xs, gys = (torch.randn(2, T, h, generator=g).bfloat16().to(dev) for _ in range(2))
    idx = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(2 * T)]).view(2, T, k).to(dev)
    gates = torch.rand(2, T, k, generator=g).to(dev)
    w1 = (torch.randn(E_, h, 2 * f, generator=g) * 0.05).bfloat16().to(dev)
    w2 = (torch.randn(E_, f, h, generator=g) * 0.05).bfloat16().to(dev)

    def run(x, i, gt, gy, a, b, group):
        x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
        plan = plan_dispatch(i, E_, group)
        rows = fp8_dispatch(x, plan, gt)
        y = fp8_expert_mlp(rows[:3], plan.local_counts, a, b, row_scale=rows.gates)
        o = combine(y, plan)
        o.backward(gy)
        return o, x.grad, a.grad, b.grad

    ref = run(xs.flatten(0, 1), idx.flatten(0, 1), gates.flatten(0, 1), gys.flatten(0, 1), w1, w2, None)
    El, rows = E_ // 2, slice(rank * T, (rank + 1) * T)
    got = run(xs[rank], idx[rank], gates[rank], gys[rank], w1[rank * El:(rank + 1) * El],
              w2[rank * El:(rank + 1) * El], dist.group.WORLD)
    want = (ref[0][rows], ref[1][rows], ref[2][rank * El:(rank + 1) * El], ref[3][rank * El:(rank + 1) * El])
    out[rank] = [float((a.float() - r.float()).abs().max() / r.float().abs().max()) for a, r in zip(got, want)]
    dist.destroy_process_group()


@pytest.mark.gpu
def test_fp8_dispatch_ep2_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import torch.multiprocessing as mp
    from megatron_dsv3.testing import free_port
    out = mp.Manager().dict()
    mp.spawn(_nccl_ep2, args=(free_port(), out), nprocs=2)
    for rank in range(2):
        # the same FP8 products per expert on both sides; bf16 outputs
        assert max(out[rank]) <= 2 ** -8, (rank, out[rank])
