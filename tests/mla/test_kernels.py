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


def test_fused_qkv_assembly_bf16_at_v3_head_dims(triton_device):
    """V3's head dims (128/64/128, interleaved rope) in bf16 against the float32 reference: one bf16 rounding."""
    dev = triton_device
    g = torch.Generator(device="cpu").manual_seed(1)
    s, b, n = (64, 1, 128) if dev == "cuda" else (2, 1, 4)
    q = torch.randn(s, b, n, 192, generator=g).to(dev, torch.bfloat16)
    kv = torch.randn(s, b, n, 256, generator=g).to(dev, torch.bfloat16)
    k_rope = torch.randn(s, b, 64, generator=g).to(dev, torch.bfloat16)
    ang = torch.rand(s, 1, 1, 32, generator=g).to(dev) * 6
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    refs = assemble_qkv_reference(q.float(), kv.float(), k_rope.float(), cos.float(), sin.float(), 128, True)
    outs = assemble_qkv_triton(q, kv, k_rope, cos, sin, 128, True)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.float(), r, rtol=1e-2, atol=1e-2)
