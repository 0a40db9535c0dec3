"""The fused MLA q/k/v assembly (mla/kernels.py) against its plain-torch reference, forward and backward."""
import pytest
import torch

from megatron_dsv3.mla.kernels import assemble_qkv_reference, assemble_qkv_triton


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("b,per_batch_positions", [(1, False), (2, False), (3, True)])
def test_fused_qkv_assembly_matches_reference(triton_device, interleaved, b, per_batch_positions):
    """float32: the kernel rotates in float32 registers like the reference's float32 ops, so outputs and all three
    input gradients agree to float32 rounding (1e-6); odd sizes leave every block ragged (n=3 heads, d_h=5,
    d_h^R=6, d_v=7), and k^R is a strided view as MLA's split of the kv down-projection gives it."""
    dev = triton_device
    g = torch.Generator(device="cpu").manual_seed(0)
    s, n, dn, dr, dv = 4, 3, 5, 6, 7
    q = torch.randn(s, b, n, dn + dr, generator=g).to(dev).requires_grad_()
    kv = torch.randn(s, b, n, dn + dv, generator=g).to(dev).requires_grad_()
    down = torch.randn(s, b, 9 + dr, generator=g).to(dev).requires_grad_()
    k_rope = down[..., 9:]                                                # [s, b, d_h^R], row stride 15
    ang = torch.rand(s, b if per_batch_positions else 1, 1, dr // 2, generator=g).to(dev) * 6
    cos, sin = ang.cos() * 1.3, ang.sin() * 1.3                           # YaRN's attention factor rides on them
    outs = assemble_qkv_triton(q, kv, k_rope, cos, sin, dn, interleaved)
    refs = assemble_qkv_reference(q, kv, k_rope, cos, sin, dn, interleaved)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    gos = [torch.randn(o.shape, generator=g).to(dev) for o in outs]
    got = torch.autograd.grad(outs, (q, kv, down), gos)
    want = torch.autograd.grad(refs, (q, kv, down), gos)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)
    assert got[2][..., :9].abs().max() == 0                               # only the k^R slice gets a gradient


@pytest.mark.parametrize("inplace", [False, True])
def test_fused_qkv_assembly_bf16_at_v3_head_dims(triton_device, inplace):
    """V3's head dims (128/64/128, interleaved rope) in bf16 against the float32 reference: one bf16 rounding (in
    place too: on a GPU, 128 heads in blocks of 16 is where a missing barrier between the rope slice's reads and
    its rotated writes would show)."""
    dev = triton_device
    g = torch.Generator(device="cpu").manual_seed(1)
    s, b, n = (64, 1, 128) if dev == "cuda" else (2, 1, 4)
    q = torch.randn(s, b, n, 192, generator=g).to(dev, torch.bfloat16)
    kv = torch.randn(s, b, n, 256, generator=g).to(dev, torch.bfloat16)
    k_rope = torch.randn(s, b, 64, generator=g).to(dev, torch.bfloat16)
    ang = torch.rand(s, 1, 1, 32, generator=g).to(dev) * 6
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    refs = assemble_qkv_reference(q.float(), kv.float(), k_rope.float(), cos.float(), sin.float(), 128, True)
    outs = assemble_qkv_triton(q, kv, k_rope, cos, sin, 128, True, inplace=inplace)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.float(), r, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("interleaved", [True, False])
def test_fused_qkv_assembly_in_place(triton_device, interleaved):
    """inplace=True: the query is q's own storage with its rope slice rotated (q, an activation, is marked modified),
    value is a view of kv, and outputs and every input gradient equal the reference's to float32 rounding (ragged
    sizes, 2 sequences); using q's old value afterwards in autograd is refused, not silently wrong."""
    dev = triton_device
    g = torch.Generator(device="cpu").manual_seed(2)
    s, b, n, dn, dr, dv = 5, 2, 3, 5, 6, 7
    q0 = torch.randn(s, b, n, dn + dr, generator=g).to(dev).requires_grad_()
    kv0 = torch.randn(s, b, n, dn + dv, generator=g).to(dev).requires_grad_()
    down = torch.randn(s, b, 9 + dr, generator=g).to(dev).requires_grad_()
    ang = torch.rand(s, 1, 1, dr // 2, generator=g).to(dev) * 6
    cos, sin = ang.cos() * 1.3, ang.sin() * 1.3
    refs = assemble_qkv_reference(q0, kv0, down[..., 9:], cos, sin, dn, interleaved)
    q, kv = q0 * 1, kv0 * 1                                               # activations, as the up-projections give
    q_ptr = q.data_ptr()
    outs = assemble_qkv_triton(q, kv, down[..., 9:], cos, sin, dn, interleaved, inplace=True)
    assert outs[0].data_ptr() == q_ptr and outs[2].data_ptr() == kv.data_ptr() + dn * kv.element_size()
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    gos = [torch.randn(o.shape, generator=g).to(dev) for o in outs]
    got = torch.autograd.grad(outs, (q0, kv0, down), gos)
    want = torch.autograd.grad(refs, (q0, kv0, down), gos)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)
    # something that saved q before the rotation cannot use it in backward any more
    q2 = q0 * 1
    kept = q2 * q2                                                        # saves q2
    assemble_qkv_triton(q2, kv0 * 1, down[..., 9:], cos, sin, dn, interleaved, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kept.sum().backward()
    with pytest.raises(ValueError, match="contiguous"):
        assemble_qkv_triton(q0.detach().transpose(0, 1).requires_grad_(), kv0, down[..., 9:], cos, sin, dn,
                            interleaved, inplace=True)
