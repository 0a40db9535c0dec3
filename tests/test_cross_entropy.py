"""The fused cross entropy (cross_entropy.py) against the plain float32 log-softmax definition."""
import pytest
import torch

from megatron_dsv3.cross_entropy import cross_entropy_reference, fused_cross_entropy_triton


@pytest.mark.parametrize("V", [37, 5000])
def test_fused_cross_entropy_loss_and_gradient(triton_device, V):
    """float32 logits: loss and d loss / d logits (softmax - onehot, times each token's incoming gradient) within
    float32 rounding of the reference; V=5000 spans two 4096-wide blocks with a ragged tail, V=37 one partial block.
    Logits with a large offset check the running max (a naive exp would overflow)."""
    dev = triton_device
    g = torch.Generator().manual_seed(0)
    s, b = 5, 2
    logits = (torch.randn(s, b, V, generator=g) * 4 + 300).to(dev)
    labels = torch.randint(0, V, (s, b), generator=g).to(dev)
    dloss = torch.randn(s, b, generator=g).to(dev)
    ref_in = logits.clone().requires_grad_()
    ref = cross_entropy_reference(ref_in, labels)
    (want,) = torch.autograd.grad(ref, ref_in, dloss)
    x = logits.clone().requires_grad_()
    loss = fused_cross_entropy_triton(x * 1, labels)               # x * 1: the consumed logits are a fresh tensor
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(loss, x, dloss)
    # exp(x - lse) with x, lse ~ 300: their float32 ulp (3e-5) bounds the error of each softmax value
    torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5)


def test_fused_cross_entropy_bf16(triton_device):
    """bf16 logits: the loss is computed in float32 from the bf16 values (as the reference on the same values), the
    gradient stored in bf16 (one rounding)."""
    dev = triton_device
    g = torch.Generator().manual_seed(1)
    V = 300
    logits = torch.randn(7, 1, V, generator=g).to(dev, torch.bfloat16)
    labels = torch.randint(0, V, (7, 1), generator=g).to(dev)
    ref_in = logits.float().requires_grad_()
    ref = cross_entropy_reference(ref_in, labels)
    (want,) = torch.autograd.grad(ref.sum(), ref_in)
    x = logits.clone().requires_grad_()
    loss = fused_cross_entropy_triton(x * 1, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize("incoming", ["per-token", "mean"])
def test_fused_cross_entropy_bf16_incoming_gradient(triton_device, incoming):
    """bf16 logits, each token's row scaled by its own incoming gradient (random per token; and the stride-0 gradient
    of a .mean(), one value for all): the product rounded once to bf16, so within bf16 rounding of the float32
    reference's gradient."""
    dev = triton_device
    g = torch.Generator().manual_seed(3)
    V = 5000
    logits = torch.randn(6, 2, V, generator=g).to(dev, torch.bfloat16)
    labels = torch.randint(0, V, (6, 2), generator=g).to(dev)
    dloss = (torch.rand(6, 2, generator=g) * 3 - 1).to(dev)
    ref_in = logits.float().requires_grad_()
    ref = cross_entropy_reference(ref_in, labels)
    x = logits.clone().requires_grad_()
    loss = fused_cross_entropy_triton(x * 1, labels)
    if incoming == "mean":
        (want,) = torch.autograd.grad(ref.mean(), ref_in)
        (got,) = torch.autograd.grad(loss.mean(), x)
    else:
        (want,) = torch.autograd.grad(ref, ref_in, dloss)
        (got,) = torch.autograd.grad(loss, x, dloss)
    assert got.dtype == torch.bfloat16
    scale = want.abs().amax().item()
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=scale * 4e-3)
    # a row whose incoming gradient is 0 is exactly 0
    if incoming == "per-token":
        dz = dloss.clone()
        dz[0, 0] = 0
        x2 = logits.clone().requires_grad_()
        (g2,) = torch.autograd.grad(fused_cross_entropy_triton(x2 * 1, labels), x2, dz)
        assert torch.count_nonzero(g2[0, 0]) == 0 and torch.count_nonzero(g2[0, 1]) > 0


def _tp2(rank):
    """TP=2 over gloo: each rank holds half the vocabulary; losses and each rank's gradient slice equal the full
    reference's."""
    from megatron_dsv3.cross_entropy import fused_cross_entropy_triton as ce
    g = torch.Generator().manual_seed(2)
    V = 100
    logits = torch.randn(6, 1, V, generator=g) * 3
    labels = torch.randint(0, V, (6, 1), generator=g)
    ref_in = logits.clone().requires_grad_()
    ref = cross_entropy_reference(ref_in, labels)
    (want,) = torch.autograd.grad(ref.sum(), ref_in)
    part = logits[..., rank * 50:(rank + 1) * 50].clone().requires_grad_()
    loss = ce(part * 1, labels, torch.distributed.group.WORLD)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(loss.sum(), part)
    torch.testing.assert_close(got, want[..., rank * 50:(rank + 1) * 50], rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_vocab_parallel(triton_device):
    if triton_device != "cpu":
        pytest.skip("the gloo harness runs the kernels on CPU tensors (interpreter)")
    from megatron_dsv3.testing import run_distributed
    run_distributed(_tp2, world_size=2)
