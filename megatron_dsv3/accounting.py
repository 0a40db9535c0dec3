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


# ---- FLOPs ---------------------------------------------------------------------------------------
# Training FLOPs per token = 3 x forward (backward = 2 x forward): 6 per activated matmul parameter, plus
# the attention scores and weighted sums, which have no parameters. Embedding lookups and norms are free.

def attention_matmul_params(cfg: "DSV3Config") -> int:
    """MLA projection weights (every one is a matmul on every token; norms excluded)."""
    h, H, m = cfg.hidden_size, cfg.num_attention_heads, cfg.mla
    if m.q_lora_rank is None:
        q = h * H * m.qk_head_dim                                          # W^Q
    else:
        q = h * m.q_lora_rank + m.q_lora_rank * H * m.qk_head_dim          # W^DQ, W^UQ|W^QR
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)                         # W^DKV|W^KR
    kv += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)         # W^UK|W^UV
    return q + kv + H * m.v_head_dim * h                                   # + W^O


def layer_matmul_params(cfg: "DSV3Config", moe_layer: bool) -> int:
    """Matmul weights one token goes through in one layer: K_r routed + shared experts, and the router's
    E x h affinity matmul (computed for every expert)."""
    h, moe = cfg.hidden_size, cfg.moe
    n = attention_matmul_params(cfg)
    if not moe_layer:
        return n + mlp_params(h, moe.dense_ffn_hidden_size)
    n += moe.top_k * mlp_params(h, moe.expert_ffn_hidden_size)
    n += mlp_params(h, moe.num_shared_experts * moe.expert_ffn_hidden_size)
    return n + moe.num_experts * h


def attention_flops_per_token(cfg: "DSV3Config", seq_len: int) -> float:
    """Forward FLOPs of one layer's q k^T and softmax(.) v for one token under the causal mask: a query
    attends to (seq_len + 1) / 2 keys on average; the dot products use d_h + d_h^R (nope + rope) dims,
    the weighted sum d_v dims (MLA: d_qk != d_v), 2 FLOPs per multiply-add, all heads."""
    m = cfg.mla
    return 2.0 * cfg.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * (seq_len + 1) / 2


def flops_breakdown(cfg: "DSV3Config", seq_len: int = None, training: bool = True) -> Dict[str, float]:
    """FLOPs per token (training: forward + backward = 3 x forward) by part: 'main' (layers + output head),
    'mtp' (D modules: M_k, one MoE layer each, the shared head again), 'attention' (the part of both that is
    scores and weighted sums) and 'total'. seq_len defaults to cfg.seq_length."""
    s = cfg.seq_length if seq_len is None else seq_len
    mult = 3.0 if training else 1.0
    h, V = cfg.hidden_size, cfg.padded_vocab_size
    attn = attention_flops_per_token(cfg, s)
    main_params = sum(layer_matmul_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers)) + V * h
    main = mult * (2.0 * main_params + cfg.num_layers * attn)
    per_mtp = 2.0 * (2 * h * h + layer_matmul_params(cfg, True) + V * h) + attn
    mtp = mult * cfg.mtp.num_layers * per_mtp
    return {"main": main, "mtp": mtp, "total": main + mtp,
            "attention": mult * (cfg.num_layers + cfg.mtp.num_layers) * attn}


def flops_per_token(cfg: "DSV3Config", seq_len: int = None, include_mtp: bool = True,
                    training: bool = True) -> float:
    """Training FLOPs per token: 6 x activated matmul parameters (output head included, embedding not)
    + causal MLA attention (q/k dim nope + rope, v dim v_head_dim) + the MTP modules when include_mtp."""
    b = flops_breakdown(cfg, seq_len, training)
    return b["total"] if include_mtp else b["main"]
