"""GPU checks (skipped without CUDA): SDPA kernels at MLA's unequal head dims, the module on CUDA vs HF."""
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_dsv3.mla.core_attention import SDPAttention
from tests.mla.common import (CONFIGS, HF_TO_OURS, build_ours, dsv3_config, full_state, hf_attention, hf_forward,
                              load_ours, rel_err)

pytestmark = pytest.mark.gpu


def _reference(q, k, v, scale):
    # float32 explicit causal softmax attention; [s, b, n, d] -> [s, b, n*dv]
    q, k, v = (t.float().permute(1, 2, 0, 3) for t in (q, k, v))
    s = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, q.shape[0], -1)


def _attention_case(s, b, n, dqk, dv):
    """-> (softmax scale, a config SDPAttention takes, the CUDA generator, bf16 q, k [s, b, n, dqk], v [.., dv])."""
    cfg = SimpleNamespace(kv_channels=dqk, attention_dropout=0.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(s, b, n, dqk, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(s, b, n, dv, device="cuda", generator=g, dtype=torch.bfloat16)
    return dqk ** -0.5, cfg, g, (q, k, v)


def _timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def test_sdpa_backends_at_mla_head_dims():
    """q/k 192, v 128, bf16, causal: cuDNN (preferred by default) runs and is correct to bf16 accuracy.

    Seen on the H200 (torch 2.11, 2026-11-29): cuDNN only 0.87 ms fwd+bwd, the default order (cuDNN first) 0.86 ms,
    efficient only 7.66 ms; rel err vs float32 2.0e-3 for all.
    """
    s, b, n, dqk, dv = 4096, 1, 16, 192, 128
    scale, cfg, g, (q, k, v) = _attention_case(s, b, n, dqk, dv)
    ref = _reference(q, k, v, scale)
    # causal forward: q k^T and p v over half the s x s pairs; backward counted as 2.5x forward (flash-attn's rule)
    flops = 3.5 * 2 * b * n * s * s * (dqk + dv) / 2
    for backends in (("cudnn",), ("cudnn", "flash", "efficient", "math"), ("efficient",)):
        attn = SDPAttention(cfg, 1, softmax_scale=scale, k_channels=dqk, v_channels=dv, backends=backends)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attn(qq, kk, vv, None)
        assert out.shape == (s, b, n * dv)
        err = rel_err(out.float(), ref)
        assert err < 2e-2, (backends, err)

        def step():
            o = attn(qq, kk, vv, None)
            o.backward(torch.ones_like(o))
        sec = _timed(step)
        print(f"SDPA {backends}: rel err {err:.1e}, fwd+bwd {sec * 1e3:.2f} ms, {flops / sec / 1e12:.0f} TFLOP/s")


@pytest.mark.parametrize("name", ["v3_yarn", "odd_halfsplit"])
def test_module_on_cuda_matches_hf(mcore_single, name):
    mla, heads, hidden, seq = CONFIGS[name]
    hf, rot = hf_attention(mla, heads, hidden, seq)
    ours = build_ours(dsv3_config(mla, heads, hidden))
    load_ours(ours, full_state(hf))
    hf, rot, ours = hf.cuda(), rot.cuda(), ours.cuda()
    x = torch.randn(2, seq, hidden, device="cuda")
    x_hf, x_ours = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    ref = hf_forward(hf, rot, x_hf, position_ids=torch.arange(seq, device="cuda")[None].expand(2, seq))
    out, _ = ours(x_ours)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    out.backward(dy.transpose(0, 1))
    own = dict(ours.named_parameters())
    errs = {"out": rel_err(out.transpose(0, 1), ref), "dx": rel_err(x_ours.grad.transpose(0, 1), x_hf.grad)}
    errs.update({k: rel_err(own[HF_TO_OURS[k]].grad, p.grad) for k, p in hf.named_parameters()})
    print(name, "cuda float32 max rel err", max(errs.values()))
    assert max(errs.values()) < 1e-5, errs


def test_flash_attention_4_at_mla_head_dims():
    """FlashAttention-4 itself (skipped without flash-attn-4: bench/fetch_fa4.sh) through SDPAttention: q/k 192,
    v 128, bf16, causal, against the float32 reference to bf16 accuracy (output and the three input gradients);
    under torch's deterministic algorithms (cuDNN's place taken by FA4's deterministic backward) the gradients of
    two runs are bit-equal."""
    from megatron_dsv3.mla.core_attention import flash_attn_4
    if flash_attn_4() is None:
        pytest.skip("flash-attn-4 does not import (bench/fetch_fa4.sh)")
    s, b, n, dqk, dv = 1024, 1, 8, 192, 128
    scale, cfg, g, (q, k, v) = _attention_case(s, b, n, dqk, dv)
    go = torch.randn(s, b, n * dv, device="cuda", generator=g, dtype=torch.bfloat16)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    _reference(*leaves, scale).backward(go.float())
    want = [t.grad for t in leaves]

    def run(attn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attn(qq, kk, vv, None)
        out.backward(go)
        return out, [qq.grad, kk.grad, vv.grad]

    attn = SDPAttention(cfg, 1, softmax_scale=scale, k_channels=dqk, v_channels=dv, backends=("fa4", "math"))
    out, grads = run(attn)
    assert rel_err(out.float(), _reference(q, k, v, scale)) < 2e-2
    for got, ref in zip(grads, want):
        assert rel_err(got.float(), ref) < 2e-2
    default = SDPAttention(cfg, 1, softmax_scale=scale, k_channels=dqk, v_channels=dv)
    try:
        torch.use_deterministic_algorithms(True)
        assert default.backends_in_use(default._deterministic())[0] == "fa4"
        (_, g1), (_, g2) = run(default), run(default)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
