"""Parameter and FLOP counts from the config alone (no model built): used by logs, MFU and benchmarks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from megatron_dsv3.config import DSV3Config


def attention_params(cfg: "DSV3Config") -> int:
    h, H, m = cfg.hidden_size, cfg.num_attention_heads, cfg.mla
    if m.q_lora_rank is None:
        q = h * H * m.qk_head_dim                                          # W^Q
    else:
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * m.qk_head_dim  # W^DQ, norm, W^UQ|W^QR
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank      # W^DKV|W^KR, norm
    kv += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)      # W^UK|W^UV
    return q + kv + H * m.v_head_dim * h                                # + W^O


def mlp_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn                                             # SwiGLU: gate, up, down


def layer_params(cfg: "DSV3Config", moe_layer: bool, activated: bool = False) -> int:
    h, moe = cfg.hidden_size, cfg.moe
    n = attention_params(cfg) + 2 * h                                   # + input and pre-MLP RMSNorm
    if not moe_layer:
        return n + mlp_params(h, moe.dense_ffn_hidden_size)
    experts = moe.top_k if activated else moe.num_experts
    n += experts * mlp_params(h, moe.expert_ffn_hidden_size)
    n += mlp_params(h, moe.num_shared_experts * moe.expert_ffn_hidden_size)
    return n + moe.num_experts * h                                      # router centroids e_i


def parameter_counts(cfg: "DSV3Config") -> Dict[str, int]:
    """total / activated exclude MTP (as the paper's 671B / 37B); mtp counts its own weights only
    (embedding and output head are shared with the main model)."""
    h, V = cfg.hidden_size, cfg.vocab_size
    emb_head = 2 * V * h + h                                            # embedding, output head, final norm
    total = emb_head + sum(layer_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
    act = emb_head + sum(layer_params(cfg, cfg.is_moe_layer(i), activated=True) for i in range(cfg.num_layers))
    per_mtp = 2 * h + 2 * h * h + h + layer_params(cfg, True)           # enorm, hnorm, M_k, final norm, block
    mtp = cfg.mtp.num_layers * per_mtp
    mtp_act = cfg.mtp.num_layers * (per_mtp - layer_params(cfg, True) + layer_params(cfg, True, activated=True))
    return {"total": total, "activated": act, "activated_non_embedding": act - V * h,
            "mtp": mtp, "mtp_activated": mtp_act,
            "total_with_mtp": total + mtp, "embedding": V * h, "output_layer": V * h}
