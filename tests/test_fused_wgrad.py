"""fused_wgrad.py: the weight gradient accumulated in place equals a plain linear's, once, on every path (the output
head, and the column / row / duplicated linears of the local specs)."""
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
