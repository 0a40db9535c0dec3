"""fused_wgrad.py: the weight gradient accumulated in place equals a plain linear's, once, on every path (the output
head, and the column / row / duplicated linears of the local specs)."""
import pytest
import torch

from megatron_dsv3.fused_wgrad import OutputHead


def _head(mcore_single_cfg):
    return OutputHead(16, 24, config=mcore_single_cfg, init_method=torch.nn.init.normal_, bias=False,
                      skip_bias_add=False, gather_output=False)


def _cfg():
    from megatron_dsv3.config import DSV3Config
    return DSV3Config.from_preset("tiny").replace(params_dtype="float64").to_transformer_config()


def test_weight_gradient_accumulates_once(mcore_single):
    """Two steps of backward (the second into an existing .grad), and a graph using the head twice (MTP):
    .grad equals the float64 sum of x^T dy over every use; dx equals dy W."""
    torch.manual_seed(0)
    head = _head(_cfg()).double()
    W = head.weight.detach().clone()
    want = torch.zeros_like(W)
    for step in range(2):
        xs = [torch.randn(5, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        dys = [torch.randn(5, 2, 24, dtype=torch.float64) for _ in range(2)]
        outs = [head(x)[0] for x in xs]                                   # the head used twice in one graph
        torch.testing.assert_close(outs[0], xs[0] @ W.t(), rtol=0, atol=1e-12)
        torch.autograd.backward(outs, dys)
        for x, dy in zip(xs, dys):
            want += dy.reshape(-1, 24).t() @ x.detach().reshape(-1, 16)
            torch.testing.assert_close(x.grad, dy @ W, rtol=0, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, want, rtol=0, atol=1e-12)


def test_input_gradient_only_pass_leaves_weight_gradient_alone(mcore_single):
    """torch.autograd.grad(out, x) (DualPipe's B of a split backward) must not touch .grad; the later W pass
    (backward with inputs=[weight]) adds it exactly once."""
    torch.manual_seed(1)
    head = _head(_cfg()).double()
    x = torch.randn(3, 1, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 1, 24, dtype=torch.float64)
    head.weight.grad = torch.ones_like(head.weight)
    out = head(x)[0]
    (dx,) = torch.autograd.grad(out, x, dy, retain_graph=True)
    torch.testing.assert_close(dx, dy @ head.weight.detach(), rtol=0, atol=1e-12)
    assert torch.equal(head.weight.grad, torch.ones_like(head.weight))
    torch.autograd.backward(out, dy, inputs=[head.weight])
    torch.testing.assert_close(head.weight.grad, 1 + dy.reshape(-1, 24).t() @ x.detach().reshape(-1, 16),
                               rtol=0, atol=1e-12)


def test_main_grad_path_follows_megatron_ddp_convention(mcore_single):
    """With main_grad and grad_added_to_main_grad (what megatron's DDP sets up): the gradient lands in main_grad,
    the flag is set, and the returned dummy is what DDP's hook discards."""
    torch.manual_seed(2)
    head = _head(_cfg()).double()
    head.weight.main_grad = torch.full_like(head.weight, 0.5)
    head.weight.grad_added_to_main_grad = False
    x = torch.randn(4, 1, 16, dtype=torch.float64)
    dy = torch.randn(4, 1, 24, dtype=torch.float64)
    head(x)[0].backward(dy)
    assert head.weight.grad_added_to_main_grad
    torch.testing.assert_close(head.weight.main_grad, 0.5 + dy.reshape(-1, 24).t() @ x.reshape(-1, 16),
                               rtol=0, atol=1e-12)


def test_column_row_and_duplicated_linears_equal_megatrons(mcore_single):
    """The spec's local linears (fused_wgrad.py's column/row, mla/linear.py's duplicated) against megatron-core's
    own Column/RowParallelLinear with the same weights: outputs, input gradients, and weight gradients over two
    backward steps (the second accumulated in place into .grad), float64."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_dsv3.fused_wgrad import FusedWgradColumnParallelLinear, FusedWgradRowParallelLinear
    from megatron_dsv3.mla.linear import DuplicatedLinear
    cfg = _cfg()
    kw = dict(config=cfg, init_method=torch.nn.init.normal_, bias=False)
    pairs = [(FusedWgradColumnParallelLinear(16, 24, gather_output=False, skip_bias_add=False, **kw),
              ColumnParallelLinear(16, 24, gather_output=False, skip_bias_add=False, **kw)),
             (FusedWgradRowParallelLinear(16, 24, input_is_parallel=True, skip_bias_add=True, **kw),
              RowParallelLinear(16, 24, input_is_parallel=True, skip_bias_add=True, **kw)),
             (DuplicatedLinear(16, 24, **kw), ColumnParallelLinear(16, 24, gather_output=False, **kw))]
    for ours, theirs in pairs:
        ours, theirs = ours.double(), theirs.double()
        with torch.no_grad():
            theirs.weight.copy_(ours.weight)
        for step in range(2):
            x = torch.randn(5, 2, 16, dtype=torch.float64)
            dy = torch.randn(5, 2, 24, dtype=torch.float64)
            outs = []
            for m in (ours, theirs):
                xi = x.clone().requires_grad_()
                y, b = m(xi)
                assert b is None
                y.backward(dy)
                outs.append((y.detach(), xi.grad))
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=1e-12)


# ---- the routed experts' grouped GEMM (grouped_mm_fused_wgrad; torch._grouped_mm runs on CPU in float32) ----------
def _grouped_case(seed, counts=(3, 0, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    N, K, M = sum(counts), 16, 8
    x = torch.randn(N, K, generator=g, requires_grad=True)
    w = torch.randn(len(counts), K, M, generator=g).requires_grad_()
    dy = torch.randn(N, M, generator=g)
    c = torch.tensor(counts)
    return x, w, dy, c, torch.cumsum(c, 0).to(torch.int32)


def _grouped_reference(x, w, dy, counts):
    """float64 per-group loop: y, dx, dW."""
    y, dx, dw, s = [], [], torch.zeros(w.shape, dtype=torch.float64), 0
    X, W, DY = x.detach().double(), w.detach().double(), dy.double()
    for e, n in enumerate(counts.tolist()):
        y.append(X[s:s + n] @ W[e])
        dx.append(DY[s:s + n] @ W[e].t())
        dw[e] = X[s:s + n].t() @ DY[s:s + n]
        s += n
    return torch.cat(y), torch.cat(dx), dw


def test_grouped_weight_gradient_accumulates_in_place():
    """Without a buffer: output and gradients bit-equal to autograd through torch._grouped_mm. With .grad there
    (the second step): the per-group GEMMs add into it (same storage), matching the float64 loop; empty groups
    included."""
    from megatron_dsv3.fused_wgrad import HostCounts, grouped_mm_fused_wgrad
    x, w, dy, c, offs = _grouped_case(0)
    y = grouped_mm_fused_wgrad(x, w, offs, HostCounts(c))
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch._grouped_mm(x2, w2, offs=offs).backward(dy)
    assert torch.equal(y, torch._grouped_mm(x2, w2, offs=offs)) and torch.equal(x.grad, x2.grad)
    assert torch.equal(w.grad, w2.grad)
    ry, rdx, rdw = _grouped_reference(x, w, dy, c)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    first, storage = w.grad.double(), w.grad.data_ptr()
    x.grad = None
    grouped_mm_fused_wgrad(x, w, offs, HostCounts(c)).backward(2 * dy)
    assert w.grad.data_ptr() == storage                                    # accumulated where it was
    torch.testing.assert_close(w.grad.double(), first + 2 * rdw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), 2 * rdx, rtol=1e-5, atol=1e-5)


def test_grouped_input_gradient_only_pass_and_main_grad():
    """An input-gradient-only pass (DualPipe's B) leaves .grad alone and the W pass adds once; with megatron DDP's
    main_grad + grad_added_to_main_grad the gradient lands in the float32 main_grad and the flag is set."""
    from megatron_dsv3.fused_wgrad import HostCounts, grouped_mm_fused_wgrad
    x, w, dy, c, offs = _grouped_case(1, counts=(4, 1, 3))
    _, rdx, rdw = _grouped_reference(x, w, dy, c)
    w.grad = torch.ones_like(w)
    y = grouped_mm_fused_wgrad(x, w, offs, HostCounts(c))
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    assert torch.equal(w.grad, torch.ones_like(w))
    torch.autograd.backward(y, dy, inputs=[w])
    torch.testing.assert_close(w.grad.double(), 1 + rdw, rtol=1e-5, atol=1e-5)

    w.grad = None
    w.main_grad = torch.full(w.shape, 0.5)
    w.grad_added_to_main_grad = False
    grouped_mm_fused_wgrad(x, w, offs, HostCounts(c)).backward(dy)
    assert w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad.double(), 0.5 + rdw, rtol=1e-5, atol=1e-5)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="the experts' grouped path runs on CUDA")
def test_grouped_experts_fused_wgrad_on_cuda():
    """moe/experts.grouped_swiglu in bf16 at uneven loads (one expert empty), two accumulating steps: the fused
    weight gradients (per-expert GEMMs into .grad, then into a float32 main_grad as megatron's DDP sets it up) equal
    the unfused grouped path's (autograd + add) within bf16 rounding, and dx is bit-equal."""
    from megatron_dsv3.moe.experts import grouped_swiglu
    g = torch.Generator(device="cuda").manual_seed(0)
    E, h, f = 4, 256, 128
    counts = torch.tensor([300, 0, 129, 83], device="cuda")
    N = int(counts.sum())
    w1 = (0.05 * torch.randn(E, h, 2 * f, device="cuda", generator=g)).bfloat16()
    w2 = (0.05 * torch.randn(E, f, h, device="cuda", generator=g)).bfloat16()
    xs = [torch.randn(N, h, device="cuda", generator=g).bfloat16() for _ in range(2)]
    dys = [torch.randn(N, h, device="cuda", generator=g).bfloat16() for _ in range(2)]
    scale = torch.rand(N, device="cuda", generator=g)

    def run(fuse, main_grad=False):
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        if main_grad:
            for p in (a, b):
                p.main_grad, p.grad_added_to_main_grad = torch.zeros(p.shape, device="cuda"), False
        dx = []
        for x, dy in zip(xs, dys):
            x = x.clone().requires_grad_()
            grouped_swiglu(x, counts, a, b, scale, fuse_wgrad=fuse).backward(dy)
            dx.append(x.grad)
        grads = [p.main_grad if main_grad else p.grad for p in (a, b)]
        return dx, grads

    dx0, ref = run(False)
    for main_grad in (False, True):
        dx, got = run(True, main_grad)
        assert all(torch.equal(a, b) for a, b in zip(dx, dx0))
        for r, o in zip(ref, got):
            torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2 * float(r.float().abs().max()))
            assert float(o[1].abs().max()) == 0.0                 # the empty expert gets nothing


def test_each_pass_computes_only_what_it_returns(monkeypatch):
    """DualPipe's W pass (backward with inputs=[weight]) runs no input-gradient GEMM, its B pass no weight-gradient
    GEMM; torch.autograd.grad asking for the weight gets it returned, .grad untouched. Both fused forms."""
    from megatron_dsv3 import fused_wgrad as FW
    x, w, dy, c, offs = _grouped_case(2, counts=(2, 3))
    _, rdx, rdw = _grouped_reference(x, w, dy, c)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: calls.append(b.dim()) or real(a, b, offs=offs))
    y = FW.grouped_mm_fused_wgrad(x * 1, w, offs, FW.HostCounts(c))           # x * 1: an activation, as in a layer
    calls.clear()
    torch.autograd.backward(y, dy, inputs=[w], retain_graph=True)             # W pass, no .grad yet: one grouped dW
    assert calls == [2] and x.grad is None
    torch.testing.assert_close(w.grad.double(), rdw, rtol=1e-5, atol=1e-5)
    calls.clear()
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)                   # B pass: dx only
    assert calls == [3]
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    before = w.grad.clone()
    dx2, dw2 = torch.autograd.grad(y, [x, w], dy)                             # the weight captured: returned
    torch.testing.assert_close(dw2.double(), rdw, rtol=1e-5, atol=1e-5)
    assert torch.equal(w.grad, before)

    W = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    d = torch.randn(4, 6, dtype=torch.float64)
    mm = []
    real_mm = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda p, q: mm.append(1) or real_mm(p, q))
    out = FW.matmul_fused_wgrad(a * 1, W)
    mm.clear()
    torch.autograd.backward(out, d, inputs=[W], retain_graph=True)
    assert mm == [] and a.grad is None                                        # no dx matmul in the W pass
    torch.testing.assert_close(W.grad, d.t() @ a.detach(), rtol=0, atol=1e-12)
    g = W.grad.clone()
    _, dW = torch.autograd.grad(out, [a, W], d)
    torch.testing.assert_close(dW, d.t() @ a.detach(), rtol=0, atol=1e-12)
    assert torch.equal(W.grad, g)


def test_grouped_weight_gradient_through_quack_contract(monkeypatch):
    """wgrad="quack": one grouped call with accumulation (quack's gemm_add_inplace, varlen K), here a plain-torch
    stand-in of its contract (A [K, total], B [total, M], out [G, K, M], cu_seqlens_k [G + 1] int32), called once per
    backward with the group boundaries from offs and no host read, landing in .grad and in a float32 main_grad as
    the per-group path does; where quack does not import (CPU here, or None), the per-group path."""
    from megatron_dsv3 import fused_wgrad as FW
    calls = []

    def fake(A, B, out, cu_seqlens_k, tuned):
        calls.append(cu_seqlens_k.tolist())
        assert tuned is not torch.are_deterministic_algorithms_enabled()
        assert cu_seqlens_k.dtype == torch.int32 and A.shape[1] == B.shape[0]
        assert out.shape[1:] == (A.shape[0], B.shape[1])
        for g in range(out.shape[0]):
            s, e = int(cu_seqlens_k[g]), int(cu_seqlens_k[g + 1])
            out[g] += (A[:, s:e].double() @ B[s:e].double()).to(out.dtype)

    class Host(FW.HostCounts):
        def get(self):
            raise AssertionError("the grouped call reads no counts on the host")

    monkeypatch.setattr(FW, "_quack_for", lambda buf: fake)              # as on a GPU with quack installed
    x, w, dy, c, offs = _grouped_case(4, counts=(3, 0, 5, 2))
    _, rdx, rdw = _grouped_reference(x, w, dy, c)
    for main_grad in (False, True):
        w2 = w.detach().clone().requires_grad_()
        if main_grad:
            w2.main_grad, w2.grad_added_to_main_grad = torch.full(w.shape, 0.5), False
        else:
            w2.grad = torch.full(w.shape, 0.5)
        x2 = x.detach().clone().requires_grad_()
        FW.grouped_mm_fused_wgrad(x2, w2, offs, Host(c), wgrad="quack").backward(dy)
        buf = w2.main_grad if main_grad else w2.grad
        torch.testing.assert_close(buf.double(), 0.5 + rdw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad.double(), rdx, rtol=1e-5, atol=1e-5)
        assert calls[-1] == [0, 3, 3, 8, 10]
    assert len(calls) == 2
    try:                                       # deterministic algorithms: quack's fixed configuration (no autotuning)
        torch.use_deterministic_algorithms(True)
        w2 = w.detach().clone().requires_grad_()
        w2.grad = torch.zeros_like(w2)
        FW.grouped_mm_fused_wgrad(x.detach(), w2, offs, Host(c), wgrad="quack").backward(dy)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(calls) == 3
    monkeypatch.setattr(FW, "_quack_for", lambda buf: None)                   # not installed: per group
    w3 = w.detach().clone().requires_grad_()
    w3.grad = torch.zeros_like(w3)
    FW.grouped_mm_fused_wgrad(x.detach(), w3, offs, FW.HostCounts(c), wgrad="quack").backward(dy)
    torch.testing.assert_close(w3.grad.double(), rdw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="wgrad must be one of"):
        FW.grouped_mm_fused_wgrad(x.detach(), w3, offs, FW.HostCounts(c), wgrad="cutlass")


def test_auto_takes_quack_for_half_precision_buffers_only(monkeypatch):
    """wgrad="auto" (the default): quack's grouped launch for a bf16/fp16 buffer where quack imports, a GEMM per
    group for a float32 main_grad (not measured against quack there) and where quack does not import."""
    from megatron_dsv3 import fused_wgrad as FW
    calls = []
    monkeypatch.setattr(FW, "accumulate_groups_quack", lambda *a: calls.append("quack"))
    monkeypatch.setattr(FW, "accumulate_groups", lambda *a: calls.append("per group"))
    args = (torch.zeros(1), torch.zeros(1), torch.tensor([1], dtype=torch.int32), None)
    monkeypatch.setattr(FW, "_quack_for", lambda buf: object())
    for dtype, want in ((torch.bfloat16, "quack"), (torch.float16, "quack"), (torch.float32, "per group")):
        FW.accumulate_groups_auto(torch.zeros(2, dtype=dtype), *args)
        assert calls.pop() == want, dtype
    monkeypatch.setattr(FW, "_quack_for", lambda buf: None)
    FW.accumulate_groups_auto(torch.zeros(2, dtype=torch.bfloat16), *args)
    assert calls == ["per group"]
    from megatron_dsv3.moe.experts import GroupedExperts
    assert GroupedExperts.wgrad == "auto" and FW.WGRAD_GROUPED["auto"] is not None


@pytest.mark.gpu
def test_quack_grouped_weight_gradient_on_cuda():
    """quack's gemm_add_inplace itself (skipped without CUDA or quack: bench/fetch_fa4.sh) with groups of any size,
    empty and odd ones included: buf[g] += x_g^T dy_g equals the float64 per-group loop within one rounding of the
    buffer, bf16 and float32 buffers, and twice from the same start gives the same bits."""
    from megatron_dsv3 import fused_wgrad as FW
    if not torch.cuda.is_available() or FW.quack_gemm_add_inplace() is None:
        pytest.skip("needs CUDA and quack (bench/fetch_fa4.sh)")
    counts = (0, 1, 37, 128, 301, 0, 8, 77)
    g = torch.Generator().manual_seed(5)
    N, K, M = sum(counts), 256, 384
    x = torch.randn(N, K, generator=g).cuda().bfloat16()
    dy = torch.randn(N, M, generator=g).cuda().bfloat16()
    start = torch.randn(len(counts), K, M, generator=g).cuda()
    c = torch.tensor(counts)
    offs = torch.cumsum(c, 0).to(torch.int32).cuda()
    want = start.double().clone()
    s = 0
    for e, n in enumerate(counts):
        want[e] += x[s:s + n].double().t() @ dy[s:s + n].double()
        s += n
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        runs = []
        for _ in range(2):
            buf = start.to(dtype).clone()
            FW.accumulate_groups_quack(buf, x, dy, offs, FW.HostCounts(c))
            runs.append(buf)
        assert torch.equal(runs[0], runs[1]), dtype
        torch.testing.assert_close(runs[0].double(), want.to(dtype).double(), rtol=tol, atol=tol * 10)
