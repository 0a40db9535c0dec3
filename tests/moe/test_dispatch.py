"""The MoE seams (megatron_dsv3/moe/dispatch.py, DeepSeekMoE's route/plan/dispatch/compute_experts/combine):

* the fused combine (float32 products, saves only the expert rows and the gates) equals the plain-torch
  combine_reference, forward and backward, in float64 (1e-12);
* with EP = 2 on gloo, the layer's steps called one by one, with asynchronous dispatch and combine, give exactly
  the fused forward's output and gradients;
* two micro-batches' all-to-alls in flight at once, waited (and back-propagated) in any order, give the same
  results as one at a time (DualPipe overlaps two micro-batches this way).
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
    gates = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
    out = _Combine.apply(y, gates, plan.pos)
    ref = combine_reference(y, gates, plan.order, T)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    go = torch.randn(T, 6, generator=g, dtype=torch.float64)
    a = torch.autograd.grad(out, (y, gates), go)
    b = torch.autograd.grad(ref, (y, gates), go)
    for x, r in zip(a, b):
        torch.testing.assert_close(x, r, rtol=0, atol=1e-12)
    if T * k < 50:   # numerical Jacobian: small cases only
        assert torch.autograd.gradcheck(lambda y_, g_: _Combine.apply(y_, g_, plan.pos), (y, gates))
    # the chunked references agree with themselves across chunk sizes (a ragged last chunk)
    from megatron_dsv3.moe.kernels import scatter_rows_reference, sum_rows_reference
    torch.testing.assert_close(sum_rows_reference(y.detach(), plan.pos, T, gates.detach(), chunk=2), ref.detach(),
                               rtol=0, atol=1e-12)
    dy, dg = scatter_rows_reference(go, y.detach(), plan.pos, gates.detach(), chunk=3)
    torch.testing.assert_close(dy, b[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(dg, b[1], rtol=0, atol=1e-12)


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
        w = torch.rand(T, k, device=dev, generator=g)
        dout = torch.randn(T, h, device=dev, generator=g).to(dtype)
        torch.testing.assert_close(K.sum_rows_triton(y, plan.pos, T, w), K.sum_rows_reference(y, plan.pos, T, w),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(K.sum_rows_triton(y, plan.pos, T), K.sum_rows_reference(y, plan.pos, T),
                                   rtol=tol, atol=tol)
        a, b = K.scatter_rows_triton(dout, y, plan.pos, w), K.scatter_rows_reference(dout, y, plan.pos, w)
        torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
        torch.testing.assert_close(a[1], b[1].float(), rtol=1e-4, atol=1e-2)


def test_dispatch_combine_single_rank_is_the_moe_sum():
    """EP = 1: combine(experts(dispatch(x))) = sum_k g_{t,k} f_{e(t,k)}(x_t), each expert a different linear map."""
    T, k, E, h = 9, 2, 4, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, h, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    W = torch.randn(E, h, h, generator=g, dtype=torch.float64)
    plan = plan_dispatch(idx, E)
    rows = dispatch(x, plan)
    e_of_row = torch.repeat_interleave(torch.arange(E), plan.local_counts)
    y = torch.einsum("nh,nhj->nj", rows, W[e_of_row])
    out = combine(y, plan, gates)
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
    pend = layer.dispatch(rows, plan, async_op=True)
    y = layer.compute_experts(pend.wait(), plan)
    routed = layer.combine(y, plan, gates, async_op=True).wait()
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
        def expert_mlp(self, x, counts, weight1, weight2):
            calls.append(tuple(x.shape))
            return padded_swiglu(x.double(), counts, weight1.double(), weight2.double()).to(x.dtype)

    torch.manual_seed(0)
    layer = _build(_cfg())
    x = torch.randn(4, 2, 32)
    want, _ = layer(x)
    layer.experts.__class__ = Float64Experts
    got, _ = layer(x)
    assert calls == [(4 * 2 * 3, 32)]                       # T * k rows, hidden 32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_triton_swiglu_matches_reference(triton_device):
    """The fused SwiGLU (forward and backward from h1 alone) against plain torch autograd; bf16 within one bf16
    rounding of the float32 computation, float32 within 1e-6."""
    from megatron_dsv3.moe import kernels as K
    dev = triton_device
    N, f = (777, 2048 + 64) if dev == "cuda" else (13, 1024 + 64)
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        h1 = (torch.randn(N, 2 * f, device=dev, generator=g) * 3).to(dtype).requires_grad_()
        d = torch.randn(N, f, device=dev, generator=g).to(dtype)
        out = K.swiglu_triton(h1)
        (dh,) = torch.autograd.grad(out, h1, d)
        ref_in = h1.detach().float().requires_grad_()
        ref = K.swiglu_reference(ref_in)
        (dref,) = torch.autograd.grad(ref, ref_in, d.float())
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(dh.float(), dref, rtol=tol, atol=tol)
