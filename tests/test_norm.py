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


@pytest.mark.parametrize("shape", [(37, 200), (2, 5, 1024)])
@pytest.mark.parametrize("dtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32)])
def test_triton_kernels_match_the_torch_function(triton_device, shape, dtype, wdtype):
    """Forward within an ulp of the torch Function (rstd summed in another order), gradients within the same
    float64 bounds; x and rstd kept."""
    from megatron_dsv3.norm import _RMSNormFunction, rms_norm_triton
    x, w, dy = _case(dtype, wdtype, shape)
    dev = triton_device
    xt, wt = x.detach().to(dev).requires_grad_(), w.detach().to(dev).requires_grad_()
    y = rms_norm_triton(xt, wt, 1e-6)
    y.backward(dy.to(dev))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _RMSNormFunction.apply(xr, wr, 1e-6)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # the normalised x is rounded to x's dtype before the weight (as the reference): one ulp of x's dtype apart
    # where rstd's last bit differs -- and Triton's interpreter truncates float32 -> bf16 where the GPU rounds to
    # nearest, one more; float32: a few ulps from rstd's summation order
    ulp = {torch.bfloat16: 2 * 2 ** -7, torch.float32: 2 ** -20}[dtype]
    assert ((y.cpu().double() - ref.double()).abs() <= ulp * ref.double().abs() + 1e-30).all()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-6).backward(dy.double())
    tol = {torch.bfloat16: 2 ** -7, torch.float32: 1e-6}[dtype]
    for got, want in ((xt.grad, x64.grad), (wt.grad, w64.grad)):
        assert got.dtype == (dtype if got is xt.grad else wdtype)
        err = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert err <= tol, (err, tol)


@pytest.mark.gpu
def test_module_takes_the_kernels_on_cuda_at_v3_width():
    from megatron_dsv3.norm import RMSNorm, _RMSNormFunction
    norm = RMSNorm(hidden_size=7168).cuda().bfloat16()
    x = torch.randn(4096, 1, 7168, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = norm(x)
    assert "Triton" in type(y.grad_fn).__name__
    ref = _RMSNormFunction.apply(x, norm.weight, norm.eps)
    assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
