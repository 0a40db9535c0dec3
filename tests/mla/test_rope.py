"""YaRN frequencies, attention factors and both rope layouts against HF and plain-math references."""
import math

import pytest
import torch

from megatron_dsv3.config import MLAConfig, YaRNConfig
from megatron_dsv3.mla.rope import RotaryEmbedding, apply_rope, inverse_frequencies, rope_attention_factor
from tests.mla.common import hf_config

YARNS = [
    YaRNConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
               mscale_all_dim=1.0),                                                  # DeepSeek-V3
    YaRNConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707,
               mscale_all_dim=0.707),                                                # DeepSeek-V2(-Lite)
    YaRNConfig(factor=8, original_max_position_embeddings=8, beta_fast=16, beta_slow=2, mscale=0.8,
               mscale_all_dim=1.2),                                                  # attention factor != 1
    YaRNConfig(factor=4, original_max_position_embeddings=256, beta_fast=32, beta_slow=1, mscale=1.0,
               mscale_all_dim=0.0),                                                  # HF falls back to mscale(s)
]


@pytest.mark.parametrize("yarn", YARNS)
@pytest.mark.parametrize("dim,base", [(64, 10000.0), (8, 500.0)])
def test_yarn_matches_hf(yarn, dim, base):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=dim, v_head_dim=16,
                    rope_theta=base, yarn=yarn)
    cfg = hf_config(mla, heads=2, hidden=32, max_pos=int(yarn.factor * yarn.original_max_position_embeddings))
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    # same float32 operations in the same order: bit-identical
    assert torch.equal(inverse_frequencies(dim, base, yarn), hf_inv)
    assert rope_attention_factor(yarn) == pytest.approx(hf_factor, rel=1e-15)
    # and the softmax scale of HF's attention (1/sqrt(d_qk) * mscale(s, mscale_all_dim)^2)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    assert mla.softmax_scale() == pytest.approx(DeepseekV3Attention(cfg, 0).scaling, rel=1e-15)


def test_yarn_matches_paper_formula():
    """Independent float64 transcription of YaRN's ramp (DeepSeek's precompute_freqs_cis): 1e-6 (float32)."""
    y, dim, base = YARNS[0], 64, 10000.0
    theta = [base ** (-2 * i / dim) for i in range(dim // 2)]

    def corr_dim(rot):  # dimension whose wavelength fits `rot` times into the original context
        return dim * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr_dim(y.beta_fast)), 0), min(math.ceil(corr_dim(y.beta_slow)), dim - 1)
    want = []
    for i, t in enumerate(theta):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep theta, 1: theta / s
        want.append(t / y.factor * ramp + t * (1 - ramp))
    got = inverse_frequencies(dim, base, y).double()
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    # high-frequency dims are extrapolated untouched, low-frequency ones fully interpolated
    assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(theta[-1] / y.factor, rel=1e-6)


def test_no_yarn_is_plain_rope():
    inv = inverse_frequencies(8, 10000.0, None).double()
    assert torch.allclose(inv, torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64),
                          rtol=1e-7)
    assert rope_attention_factor(None) == 1.0


def test_layouts_against_complex_rotation():
    """interleaved: pairs (x[2i], x[2i+1]) rotated as complex numbers (DeepSeek's reference); half-split:
    (x[i], x[i+d/2]) (rotate_half). float64, exact up to 1e-14."""
    torch.manual_seed(0)
    d, s = 8, 5
    x = torch.randn(s, 2, 3, d, dtype=torch.float64)
    ang = torch.rand(s, 1, 1, d // 2, dtype=torch.float64) * 6
    rot = torch.polar(torch.ones_like(ang), ang)
    # interleaved: complex reference keeps pairs in place; ours returns [evens | odds]
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(s, 2, 3, d // 2, 2)) * rot)  # [..., d/2, 2]
    got = apply_rope(x, ang.cos(), ang.sin(), interleaved=True)
    assert torch.allclose(got, torch.cat((ref[..., 0], ref[..., 1]), -1), atol=1e-14)
    # half-split
    ref = torch.view_as_real(torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot)
    got = apply_rope(x, ang.cos(), ang.sin(), interleaved=False)
    assert torch.allclose(got, torch.cat((ref[..., 0], ref[..., 1]), -1), atol=1e-14)
    # relative position: <R(m) q, R(n) k> depends on m - n only, in both layouts
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    inv = inverse_frequencies(d, 10000.0).double()
    for inter in (True, False):
        def dot(m, n):
            a, b = m * inv, n * inv
            return apply_rope(q, a.cos(), a.sin(), inter) @ apply_rope(k, b.cos(), b.sin(), inter)
        assert dot(7, 3).item() == pytest.approx(dot(104, 100).item(), rel=1e-12)   # floats: approx on 0-d tensors breaks under pytest 9.2


def test_cos_sin_cache_and_position_ids():
    mla = MLAConfig(q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    yarn=YARNS[2])
    rot = RotaryEmbedding(mla)
    cos, sin = rot.cos_sin(10, torch.device("cpu"), torch.float32)
    assert cos.shape == (10, 1, 1, 4)
    assert rot.cos_sin(10, torch.device("cpu"), torch.float32)[0] is cos          # cached
    assert rot.cos_sin(10, torch.device("cpu"), torch.float64)[0].dtype == torch.float64
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    pcos, psin = rot.cos_sin(3, torch.device("cpu"), torch.float32, position_ids=pos)  # [s, b, 1, d/2]
    assert pcos.shape == (3, 2, 1, 4)
    full_cos, _ = rot.cos_sin(8, torch.device("cpu"), torch.float32)
    assert torch.equal(pcos[:, 1], full_cos[5:8, 0])
    # the angles the model hands every layer: [s, b, 1, d/2] = position x theta_i, float32
    ang = rot.angles(pos)
    assert ang.shape == (3, 2, 1, 4) and ang.dtype == torch.float32
    assert torch.equal(ang[:, :, 0], pos.T[..., None].float() * inverse_frequencies(8, mla.rope_theta, YARNS[2]))
    # cos^2 + sin^2 = attention_factor^2
    assert torch.allclose(pcos ** 2 + psin ** 2, torch.full_like(pcos, rope_attention_factor(YARNS[2]) ** 2))
