"""The MoE seams (megatron_dsv3/moe/dispatch.py, DeepSeekMoE's route/plan/dispatch/compute_experts/combine):

* the fused (unweighted) combine equals the plain-torch combine_reference, forward and backward, in float64
  (1e-12); the dispatched gates are each row's g_{t,j};
* with EP = 2 on gloo, the layer's steps called one by one, with asynchronous dispatch and combine, give exactly
  the fused forward's output and gradients;
* two micro-batches' all-to-alls in flight at once, waited (and back-propagated) in any order, give the same
  results as one at a time (DualPipe overlaps two micro-batches this way);
* the gates applied before the down-projection: the layer against a float64 per-token loop of
  sum_j g_j FFN_j(x) (router gradients through the gates), and the bytes kept for backward fall by the expert
  output rows the weighted combine kept.
"""
import pytest
import torch
import torch.distributed as dist

from megatron_dsv3.moe.dispatch import _Combine, all_to_all, combine, combine_reference, dispatch, plan_dispatch
from megatron_dsv3.testing import run_distributed


@pytest.mark.parametrize("T,k,E", [(7, 3, 8), (1, 1, 2), (300, 8, 32)])
def test_combine_matches_reference(T, k, E):
    g = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    plan = plan_dispatch(idx, E)
    assert torch.equal(plan.order[plan.pos], torch.arange(T * k))                     # pos inverts order
    y = torch.randn(T * k, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = _Combine.apply(y, plan.token_of_row, plan.pos, T)
    ref = combine_reference(y, plan.order, T)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    go = torch.randn(T, 6, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad(out, y, go)
    (b,) = torch.autograd.grad(ref, y, go)
    torch.testing.assert_close(a, b, rtol=0, atol=0)                                  # a gather: exact
    if T * k < 50:   # numerical Jacobian: small cases only
        assert torch.autograd.gradcheck(lambda y_: _Combine.apply(y_, plan.token_of_row, plan.pos, T), (y,))
    # the chunked reference agrees with itself across chunk sizes (a ragged last chunk)
    from megatron_dsv3.moe.kernels import sum_rows_reference
    torch.testing.assert_close(sum_rows_reference(y.detach(), plan.pos, T, chunk=2), ref.detach(), rtol=0,
                               atol=1e-12)


def test_dispatched_gates_are_each_rows_gate():
    """Rows.gates[r] is g_{t,j} of the (token, choice) row r is, and their gradient goes back to that gate."""
    T, k, E = 9, 3, 5
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, 4, generator=g, dtype=torch.float64)
    plan = plan_dispatch(idx, E)
    rows = dispatch(x, plan, gates)
    t, j = plan.order // k, plan.order % k
    assert torch.equal(rows.x, x[t]) and torch.equal(rows.gates, gates.detach()[t, j])
    w = torch.randn(T * k, generator=g, dtype=torch.float64)
    (dg,) = torch.autograd.grad(rows.gates, gates, w)
    assert torch.equal(dg[t, j], w)


def test_permute_backward_sums_each_tokens_rows():
    from megatron_dsv3.moe.dispatch import _Permute
    T, k, E = 11, 3, 6
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    plan = plan_dispatch(idx, E)
    x = torch.randn(T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = _Permute.apply(x, plan.token_of_row, plan.pos)
    torch.testing.assert_close(out, x[plan.token_of_row])
    go = torch.randn(T * k, 4, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, go)
    (want,) = torch.autograd.grad(x[plan.token_of_row], x, go)
    torch.testing.assert_close(dx, want, rtol=0, atol=1e-12)


def test_triton_kernels_match_references(triton_device):
    """Bit-level agreement is not expected (summation order); bf16 outputs within one bf16 rounding of the float32
    reference, float32 within 1e-6. On CPU through Triton's interpreter, at a smaller size (ragged last block kept)."""
    from megatron_dsv3.moe import kernels as K
    assert K.HAVE_TRITON
    dev = triton_device
    T, k, E, h = (1000, 8, 32, 7168 + 64) if dev == "cuda" else (24, 3, 6, 1024 + 64)
    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.stack([torch.randperm(E, device=dev, generator=g)[:k] for _ in range(T)])
    plan = plan_dispatch(idx, E)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        y = torch.randn(T * k, h, device=dev, generator=g).to(dtype)
        torch.testing.assert_close(K.sum_rows_triton(y, plan.pos, T), K.sum_rows_reference(y, plan.pos, T),
                                   rtol=tol, atol=tol)


def test_dispatch_combine_single_rank_is_the_moe_sum():
    """EP = 1: combine(g * experts(dispatch(x))) = sum_k g_{t,k} f_{e(t,k)}(x_t), each expert a different linear
    map, the dispatched gates scaling the rows."""
    T, k, E, h = 9, 2, 4, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, h, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    W = torch.randn(E, h, h, generator=g, dtype=torch.float64)
    plan = plan_dispatch(idx, E)
    rows = dispatch(x, plan, gates)
    e_of_row = torch.repeat_interleave(torch.arange(E), plan.local_counts)
    y = torch.einsum("nh,nhj->nj", rows.x, W[e_of_row]) * rows.gates[:, None]
    out = combine(y, plan)
    want = sum(gates[:, j:j + 1] * torch.einsum("th,thj->tj", x, W[idx[:, j]]) for j in range(k))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def _steps_vs_fused(rank):
    from megatron.core import parallel_state as ps
    from tests.moe.test_distributed import _build, _cfg
    torch.manual_seed(0)
    layer = _build(_cfg(ep=2)).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if name == "router.weight" else 0.1)
    g = torch.Generator().manual_seed(10 + rank)
    x0 = torch.randn(6, 2, 32, generator=g, dtype=torch.float64)
    go = torch.randn(6, 2, 32, generator=g, dtype=torch.float64)

    def grads():
        return [p.grad.clone() for p in layer.parameters()]

    x = x0.clone().requires_grad_()
    out, _ = layer(x)
    out.backward(go)
    fused = (out.detach(), x.grad.clone(), grads())
    layer.zero_grad()

    # the same layer step by step, the combine asynchronous too, the shared experts computed last
    x = x0.clone().requires_grad_()
    rows, idx, gates = layer.route(x)
    plan = layer.plan(idx)
    assert plan.ep == 2 and sum(plan.send_splits) == rows.shape[0] * idx.shape[1]
    pend = layer.dispatch(rows, plan, gates, async_op=True)
    y = layer.compute_experts(pend.wait(), plan)
    routed = layer.combine(y, plan, async_op=True).wait()
    out2 = layer.finish(routed, layer.shared(x), x.shape)
    out2.backward(go)
    steps = (out2.detach(), x.grad.clone(), grads())
    d = max(float((a - b).abs().max()) for a, b in zip([fused[0], fused[1], *fused[2]],
                                                       [steps[0], steps[1], *steps[2]]))
    dist.barrier()
    return {"max_diff": d, "ep": ps.get_expert_model_parallel_world_size()}


def _two_in_flight(rank):
    """Two micro-batches' all-to-alls started before either is waited; waited and back-propagated in reverse."""
    from megatron.core import parallel_state as ps
    group = ps.get_expert_model_parallel_group()
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(5 + 3 * i, 4, generator=g, dtype=torch.float64, requires_grad=True) for i in range(2)]
    splits = [[2, 3], [4, 4]]                     # rows sent to rank 0 / 1, per micro-batch
    recv = [None, None]
    recv_splits = []
    for i in range(2):                            # exchange the split sizes first (as plan_dispatch does)
        s = torch.tensor(splits[i])
        r = torch.empty_like(s)
        dist.all_to_all_single(r, s, group=group)
        recv_splits.append(r.tolist())

    def run(order):
        for x in xs:
            x.grad = None
        pend = [all_to_all(xs[i], recv_splits[i], splits[i], group, async_op=True) for i in range(2)]
        for i in order:
            recv[i] = pend[i].wait()
        losses = [(recv[i] * (i + 1.5)).pow(2).sum() for i in range(2)]
        for i in order:                           # backward of one while the other's reverse all-to-all is in flight
            losses[i].backward()
        return [r.detach().clone() for r in recv], [x.grad.clone() for x in xs]

    a, b = run([0, 1]), run([1, 0])
    sync = [all_to_all(xs[i], recv_splits[i], splits[i], group) for i in range(2)]
    dist.barrier()
    return {"same_out": all(torch.equal(p, q) for p, q in zip(a[0], b[0])),
            "same_grad": all(torch.equal(p, q) for p, q in zip(a[1], b[1])),
            "like_sync": all(torch.equal(p, q.detach()) for p, q in zip(a[0], sync)),
            "grad_is_2x_scale2": all(torch.allclose(gx, 2 * (i + 1.5) ** 2 * xs[i].detach())
                                     for i, gx in enumerate(a[1]))}


def test_steps_equal_fused_forward_ep2():
    for r in run_distributed(_steps_vs_fused, 2, ep=2, timeout=120):
        assert r["ep"] == 2 and r["max_diff"] == 0.0, r


def test_two_micro_batches_in_flight_any_order():
    for r in run_distributed(_two_in_flight, 2, ep=2, timeout=120):
        assert all(r.values()), r


def test_expert_gemm_hook_is_the_one_method_a_precision_overrides(mcore_single):
    """A GroupedExperts subclass overriding expert_mlp alone changes the routed experts' GEMMs (here: computes them
    in float64 and records the call), and nothing else of the layer."""
    from megatron_dsv3.moe.experts import GroupedExperts, padded_swiglu
    from tests.moe.test_distributed import _build, _cfg
    calls = []

    class Float64Experts(GroupedExperts):
        def expert_mlp(self, x, counts, weight1, weight2, row_scale=None):
            calls.append(tuple(x.shape))
            return padded_swiglu(x.double(), counts, weight1.double(), weight2.double(), row_scale).to(x.dtype)

    torch.manual_seed(0)
    layer = _build(_cfg())
    x = torch.randn(4, 2, 32)
    want, _ = layer(x)
    layer.experts.__class__ = Float64Experts
    got, _ = layer(x)
    assert calls == [(4 * 2 * 3, 32)]                       # T * k rows, hidden 32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_triton_swiglu_matches_reference(triton_device):
    """The fused SwiGLU (forward and backward from h1 and the row scale alone), with and without the rows' gates,
    against plain torch autograd in float64: bf16 within one bf16 rounding, float32 within 1e-6; d row_scale
    (float32 dots over f) within 1e-5 relative of its largest."""
    from megatron_dsv3.moe import kernels as K
    dev = triton_device
    N, f = (777, 2048 + 64) if dev == "cuda" else (13, 1024 + 64)
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        for scaled in (False, True):
            h1 = (torch.randn(N, 2 * f, device=dev, generator=g) * 3).to(dtype).requires_grad_()
            s = torch.rand(N, device=dev, generator=g).requires_grad_() if scaled else None
            d = torch.randn(N, f, device=dev, generator=g).to(dtype)
            out = K.swiglu_triton(h1, s)
            got = torch.autograd.grad(out, [h1] + ([s] if scaled else []), d)
            ref_h1 = h1.detach().double().requires_grad_()
            ref_s = s.detach().double().requires_grad_() if scaled else None
            ref = K.swiglu_reference(ref_h1, ref_s)
            want = torch.autograd.grad(ref, [ref_h1] + ([ref_s] if scaled else []), d.double())
            assert out.dtype == dtype and got[0].dtype == dtype
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
            if scaled:
                assert got[1].dtype == torch.float32
                err = float((got[1].double() - want[1]).abs().max() / want[1].abs().max())
                assert err < 1e-5, err
                # the scale matters: without it the output differs
                assert (out.double() - K.swiglu_reference(ref_h1.detach())).abs().max() > 0.1


def test_swiglu_torch_path_matches_autograd_reference():
    """The non-Triton path (the same Function over torch formulas, keeping h1 and the scale only) against plain
    autograd through swiglu_reference, float64: 1e-12; gradcheck on a small case."""
    from megatron_dsv3.moe import kernels as K
    g = torch.Generator().manual_seed(1)
    h1 = torch.randn(7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(7, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(7, 5, generator=g, dtype=torch.float64)
    out = K.swiglu(h1, s)
    ref = K.swiglu_reference(h1, s)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (h1, s), d), torch.autograd.grad(ref, (h1, s), d)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: K.swiglu(a, b), (h1, s))
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        K.swiglu(h1, s)
    assert {(tuple(t.shape), t.dtype) for t in seen} == {((7, 10), torch.float64), ((7,), torch.float64)}


def test_gates_before_the_down_projection_against_float64_loop(mcore_single):
    """The layer (gates scaling the SwiGLU output, unweighted combine) against a float64 per-token loop of eq. 12,
    sum_j g_{t,j} FFN_{e(t,j)}(u_t) with the gate applied after each expert, over the same router and shared
    experts: output and every gradient within 1e-12. The router's weight gets its gradient only through the gates
    (the top-k choice has none, the balance loss is off here), so its match is the gate gradient's."""
    import torch.nn.functional as F
    from tests.moe.test_distributed import _build, _cfg
    torch.manual_seed(0)
    layer = _build(_cfg(seq_aux_loss_coeff=0.0)).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if name == "router.weight" else 0.1)
        layer.router.expert_bias.normal_(0, 0.1)
    ref = _build(_cfg(seq_aux_loss_coeff=0.0)).double()
    ref.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(5, 2, 32, generator=g, dtype=torch.float64)
    go = torch.randn(5, 2, 32, generator=g, dtype=torch.float64)
    x = x0.clone().requires_grad_()
    out, _ = layer(x)
    out.backward(go)

    xr = x0.clone().requires_grad_()
    u, idx, gates = ref.route(xr)                                              # [T, h], [T, k], [T, k]
    W1, W2 = ref.experts.weight1, ref.experts.weight2
    routed = []
    for t in range(u.shape[0]):
        acc = torch.zeros_like(u[t])
        for j in range(idx.shape[1]):
            gate, up = (u[t] @ W1[idx[t, j]]).chunk(2)
            acc = acc + gates[t, j] * ((F.silu(gate) * up) @ W2[idx[t, j]])      # g (a W2): after the expert
        routed.append(acc)
    out_ref = ref.finish(torch.stack(routed), ref.shared(xr), xr.shape)
    out_ref.backward(go)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
    assert layer.router.weight.grad.abs().max() > 1e-3


def _kept_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while fn() runs (parameters not counted)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _WeightedCombine(torch.autograd.Function):
    """The combine as it was (out[t] = sum_j g_{t,j} y[pos[t*k + j]]): it keeps the expert output rows y for the
    gates' gradient dg_{t,j} = <dout_t, y_{t,j}>, plus the gates and pos. Forward only: for the bytes it keeps."""

    @staticmethod
    def forward(ctx, y, gates, pos):
        ctx.save_for_backward(y, gates, pos)
        T, k = gates.shape
        return (y.index_select(0, pos).view(T, k, -1).float() * gates.unsqueeze(-1)).sum(1).to(y.dtype)


def test_kept_bytes_fall_by_the_expert_output_rows(mcore_single):
    """The bytes DeepSeekMoE keeps for backward (saved_tensors_hooks, bf16, T tokens, top-k, hidden h) against the
    same layer with the weighted combine after the down-projection (the experts unscaled): k * h * 2 bytes a token
    fewer, within 5% (the gates' float32 copies and indices move between the two, 4-16 bytes a row; measured here:
    13,572 -> 9,511 bytes a token at h = 512, k = 4, 4,061 against 4,096)."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.specs import get_moe_spec
    h, k, s, b = 512, 4, 16, 4
    cfg = DSV3Config.from_preset("tiny", hidden_size=h, moe=dict(
        num_experts=8, top_k=k, n_group=1, topk_group=1, num_shared_experts=1, expert_ffn_hidden_size=64,
        seq_aux_loss_coeff=0.0))
    torch.manual_seed(0)
    layer = build_module(get_moe_spec(cfg), config=cfg.to_transformer_config()).bfloat16()
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)

    def weighted_after():                      # the former composition of the seams
        u, idx, gates = layer.route(x)
        plan = layer.plan(idx)
        rows = layer.dispatch(u, plan, gates)
        y = layer.experts(rows.x, plan.local_counts)
        out = _WeightedCombine.apply(y, gates, plan.pos)
        return layer.finish(out, layer.shared(x), x.shape)

    now = _kept_bytes(lambda: layer(x))
    before = _kept_bytes(weighted_after)
    T = s * b
    assert (before - now) / T == pytest.approx(k * h * 2, rel=0.05), ((before - now) / T, k * h * 2)
    assert now / T < 0.8 * before / T                                  # the rows were a large share of the block
