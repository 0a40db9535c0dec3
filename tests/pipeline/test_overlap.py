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
    p = dispatch(x * 2, plan, async_op=True)
    in_flight, leaf = p.cut()
    assert leaf.is_leaf and leaf.requires_grad and not in_flight.is_leaf
    y = p.wait() * 3
    y.backward(g)
    assert x.grad is None and leaf.grad is not None          # stopped at the cut
    torch.autograd.backward(in_flight, leaf.grad)
    expected = torch.zeros_like(x).index_add_(0, plan.token_of_row, 6 * g)     # rows sorted by expert -> tokens
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-15)
