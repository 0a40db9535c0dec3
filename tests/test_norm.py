"""RMSNorm (norm.py): the autograd Function that keeps x and rstd only, against the plain-ops reference and float64."""
import pytest
import torch

from megatron_dsv3.norm import RMSNorm, rms_norm_reference


def _case(dtype, wdtype, shape=(5, 3, 256)):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(wdtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(torch.promote_types(dtype, wdtype))
    return x, w, dy


@pytest.mark.parametrize("dtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_forward_is_the_reference_and_gradients_match_float64(dtype, wdtype):
    x, w, dy = _case(dtype, wdtype)
    norm = RMSNorm(hidden_size=x.shape[-1], eps=1e-6)
    norm.weight = torch.nn.Parameter(w.detach().clone())
    y = norm(x)
    ref = rms_norm_reference(x.detach(), w.detach(), 1e-6)
    assert y.dtype == ref.dtype and torch.equal(y, ref)                     # forward bit for bit
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-6).backward(dy.double())
    tol = {torch.bfloat16: 2 ** -7, torch.float32: 1e-6, torch.float64: 1e-13}[dtype]
    for got, want in ((x.grad, x64.grad), (norm.weight.grad, w64.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, (err, tol)
    # and as close as autograd through the plain ops in the same dtypes (both at rounding level: a wrong formula
    # is orders of magnitude off)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rms_norm_reference(xr, wr, 1e-6).backward(dy)
    for got, plain, want in ((x.grad, xr.grad, x64.grad), (norm.weight.grad, wr.grad, w64.grad)):
        assert (got.double() - want).norm() <= 1.25 * (plain.double() - want).norm() + 1e-13 * want.norm()


def test_keeps_only_the_input_and_rstd():
    x, w, _ = _case(torch.bfloat16, torch.bfloat16, (64, 512))
    norm = RMSNorm(hidden_size=512)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.untyped_storage().data_ptr() != norm.weight.untyped_storage().data_ptr()}
    assert sum(kept.values()) == 64 * 512 * 2 + 64 * 4                       # x (bf16) and rstd (float32)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm_reference(x, norm.weight, 1e-6)
    plain = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
             if t.untyped_storage().data_ptr() != norm.weight.untyped_storage().data_ptr()}
    assert sum(plain.values()) >= 64 * 512 * (4 + 2)                       # the float32 copy + normalised x
