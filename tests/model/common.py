"""Helpers for the model tests: tiny configs, the HF oracle (DeepseekV3ForCausalLM), HF -> ours weight copy."""
from __future__ import annotations

import torch

from megatron_dsv3.config import DSV3Config, MLAConfig, YaRNConfig

# HF (model.layers.{i}.) suffix -> ours (decoder.layers.{i}.)  (interfaces.md)
LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
}


def small_config(name: str) -> DSV3Config:
    """Two tiny configs for HF parity: 3 layers (1 dense + 2 MoE), vocab 128 (= padded), MTP off."""
    base = DSV3Config.from_preset("tiny").replace(
        hidden_size=64, num_attention_heads=4, vocab_size=128, num_layers=3, mtp={"num_layers": 0},
        moe={"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 2, "expert_ffn_hidden_size": 32,
             "dense_ffn_hidden_size": 96, "first_k_dense_replace": 1, "num_shared_experts": 1})
    if name == "no_q_lora":
        # V2-Lite-style attention (no query compression), plain interleaved rope, softmax-free sigmoid router
        mla = MLAConfig(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=12, rope_interleave=True, yarn=None)
        return base.replace(mla=mla, max_position_embeddings=64)
    if name == "yarn":
        # V3-style: q compression, YaRN with original context 16, run at 40 > 16
        mla = MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        rope_interleave=True,
                        yarn=YaRNConfig(factor=4, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                                        mscale=1.0, mscale_all_dim=1.0))
        return base.replace(mla=mla, max_position_embeddings=64, moe={"routed_scaling_factor": 2.5})
    raise ValueError(name)


def hf_model(cfg: DSV3Config, seed: int = 0):
    """DeepseekV3ForCausalLM with the same shapes, random weights (random norms and expert bias too)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    # to_hf() writes no num_key_value_heads; HF's default (128) breaks repeat_kv for other head counts
    hc = DeepseekV3Config(**dict(cfg.to_hf(), num_key_value_heads=cfg.num_attention_heads))
    hc._attn_implementation = "eager"
    hc._experts_implementation = "eager"   # the plain per-expert loop (also works in float64)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hc).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def hf_to_ours(hf_state: dict, num_layers: int) -> dict:
    """HF DeepseekV3ForCausalLM state dict (in-memory fused experts) -> our names (TP = EP = 1)."""
    out = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"],
           "output_layer.weight": hf_state["lm_head.weight"]}
    for i in range(num_layers):
        pre, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_suffix, our_suffix in LAYER_MAP.items():
            if pre + hf_suffix in hf_state:
                out[ours + our_suffix] = hf_state[pre + hf_suffix]
        if pre + "mlp.gate_proj.weight" in hf_state:    # dense: [gate; up] stacked (megatron GLU layout)
            out[ours + "mlp.linear_fc1.weight"] = torch.cat(
                (hf_state[pre + "mlp.gate_proj.weight"], hf_state[pre + "mlp.up_proj.weight"]))
        if pre + "mlp.experts.gate_up_proj" in hf_state:
            out[ours + "mlp.experts.weight1"] = hf_state[pre + "mlp.experts.gate_up_proj"].transpose(1, 2)  # [E,h,2f]
            out[ours + "mlp.experts.weight2"] = hf_state[pre + "mlp.experts.down_proj"].transpose(1, 2)     # [E,f,h]
            out[ours + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                (hf_state[pre + "mlp.shared_experts.gate_proj.weight"],
                 hf_state[pre + "mlp.shared_experts.up_proj.weight"]))
    return {k: v.detach().clone() for k, v in out.items()}


def load_full(model, state: dict) -> None:
    """Copy `state` into `model`; every parameter and buffer of the model must be covered, except MTP."""
    own = model.state_dict()
    wanted = {k for k in own if not k.endswith("_extra_state") and not k.startswith("mtp.")}
    missing, unknown = wanted - set(state), set(state) - set(own)
    assert not missing and not unknown, (sorted(missing), sorted(unknown))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
