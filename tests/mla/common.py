"""Shared helpers for the MLA tests: tiny configs, the HF oracle, weight copy, comparisons."""
from __future__ import annotations

import torch

from megatron_dsv3.config import DSV3Config, MLAConfig, YaRNConfig

# HF name -> our name (interfaces.md)
HF_TO_OURS = {
    "q_a_proj.weight": "linear_q_down_proj.weight",
    "q_a_layernorm.weight": "q_layernorm.weight",
    "q_b_proj.weight": "linear_q_up_proj.weight",
    "q_proj.weight": "linear_q_proj.weight",
    "kv_a_proj_with_mqa.weight": "linear_kv_down_proj.weight",
    "kv_a_layernorm.weight": "kv_layernorm.weight",
    "kv_b_proj.weight": "linear_kv_up_proj.weight",
    "o_proj.weight": "linear_proj.weight",
}
# the dim each of our params is split on over TP (None = duplicated)
TP_DIM = {"linear_q_down_proj.weight": None, "q_layernorm.weight": None, "linear_q_up_proj.weight": 0,
          "linear_q_proj.weight": 0, "linear_kv_down_proj.weight": None, "kv_layernorm.weight": None,
          "linear_kv_up_proj.weight": 0, "linear_proj.weight": 1}


def dsv3_config(mla: MLAConfig, heads: int, hidden: int, dtype: str = "float32", tp: int = 1,
                sequence_parallel: bool = False) -> DSV3Config:
    return DSV3Config.from_preset("tiny").replace(
        hidden_size=hidden, num_attention_heads=heads, mla=mla, params_dtype=dtype,
        parallel={"tensor_model_parallel_size": tp, "sequence_parallel": sequence_parallel})


# name -> (MLAConfig, heads, hidden, seq)
CONFIGS = {
    # V3-like: q compression, interleaved rope, YaRN (mscale == mscale_all_dim), seq beyond the original context
    "v3_yarn": (MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          rope_theta=10000.0, rope_interleave=True,
                          yarn=YaRNConfig(factor=4, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                                          mscale=1.0, mscale_all_dim=1.0)), 4, 32, 40),
    # odd sizes: 6 heads, rope 8, v != nope, half-split rope, mscale != mscale_all_dim (cos/sin factor != 1)
    "odd_halfsplit": (MLAConfig(q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=10, qk_rope_head_dim=8,
                                v_head_dim=6, rope_theta=500.0, rope_interleave=False,
                                yarn=YaRNConfig(factor=8, original_max_position_embeddings=8, beta_fast=16,
                                                beta_slow=2, mscale=0.8, mscale_all_dim=1.2)), 6, 36, 29),
    # V2-Lite-like: no q compression, YaRN with mscale 0.707 = mscale_all_dim
    "v2lite_noq": (MLAConfig(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                             v_head_dim=14, rope_theta=10000.0, rope_interleave=True,
                             yarn=YaRNConfig(factor=40, original_max_position_embeddings=12, beta_fast=32,
                                             beta_slow=1, mscale=0.707, mscale_all_dim=0.707)), 4, 32, 33),
    # plain rope, no YaRN
    "plain_rope": (MLAConfig(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                             rope_interleave=False), 2, 16, 11),
}


def hf_config(mla: MLAConfig, heads: int, hidden: int, max_pos: int, version: int = 3):
    if version == 3:
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as C
    else:
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config as C
    rope = {"rope_type": "default", "rope_theta": mla.rope_theta}
    if mla.yarn is not None:
        y = mla.yarn
        rope = {"rope_type": "yarn", "rope_theta": mla.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                "mscale_all_dim": y.mscale_all_dim}
    kw = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
              q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
              qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, max_position_embeddings=max_pos,
              rope_parameters=rope, attention_bias=False, attention_dropout=0.0, num_hidden_layers=1,
              vocab_size=64, intermediate_size=32, moe_intermediate_size=16)
    if version == 3:
        kw["rope_interleave"] = mla.rope_interleave
    cfg = C(**kw)
    cfg._attn_implementation = "eager"  # the oracle: explicit softmax, not SDPA
    return cfg


def hf_attention(mla, heads, hidden, seq, version=3, dtype=torch.float32, seed=0):
    """HF attention + rotary embedding with random weights (norm weights random too)."""
    if version == 3:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
        attn_cls, rot_cls = m.DeepseekV3Attention, m.DeepseekV3RotaryEmbedding
    else:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m
        attn_cls, rot_cls = m.DeepseekV2Attention, m.DeepseekV2RotaryEmbedding
    max_pos = int(mla.yarn.factor * mla.yarn.original_max_position_embeddings) if mla.yarn else max(seq, 64)
    cfg = hf_config(mla, heads, hidden, max_pos, version)
    g = torch.Generator().manual_seed(seed)
    attn = attn_cls(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return attn.to(dtype), rot_cls(cfg)


def hf_forward(attn, rot, x_bsh, position_ids=None, pad_mask=None, version=3):
    """x [b, s, h] -> [b, s, h]; causal (+ padding: pad_mask [b, s] True = padded key)."""
    b, s, _ = x_bsh.shape
    dev = x_bsh.device
    if position_ids is None:
        position_ids = torch.arange(s, device=dev)[None].expand(b, s)
    neg = torch.finfo(x_bsh.dtype).min
    masked = torch.ones(s, s, dtype=torch.bool, device=dev).triu(1)[None, None].expand(b, 1, s, s)
    if pad_mask is not None:
        masked = masked | pad_mask.to(dev)[:, None, None, :]
    mask = torch.zeros(b, 1, s, s, dtype=x_bsh.dtype, device=dev).masked_fill(masked, neg)
    if version == 3:
        cos, sin = rot(x_bsh, position_ids)
        out, _ = attn(x_bsh, position_embeddings=(cos, sin), attention_mask=mask)
    else:
        out, _ = attn(x_bsh, position_embeddings=rot(x_bsh, position_ids), attention_mask=mask)
    return out


def build_ours(cfg: DSV3Config, pg_collection=None, backend="local"):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3.specs import get_mla_spec
    return build_module(get_mla_spec(cfg, backend), config=cfg.to_transformer_config(), layer_number=1,
                        pg_collection=pg_collection)


def full_state(hf_attn) -> dict:
    """HF state dict under our names (TP=1)."""
    return {HF_TO_OURS[k]: v.detach().clone() for k, v in hf_attn.state_dict().items()}


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    dim = TP_DIM[name]
    return full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[rank]


def load_ours(ours, state: dict, rank: int = 0, tp: int = 1):
    own = dict(ours.named_parameters())
    assert set(own) == set(state), (sorted(own), sorted(state))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(shard(k, v, rank, tp))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
