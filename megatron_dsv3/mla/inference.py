"""MLA inference: compressed KV cache + weight absorption (DeepSeek-V2 section 2.1.2, V3 section 2.1.1).

Per token and layer the cache holds only c^KV (kv_lora_rank, after its RMSNorm) and the rotated k^R
(qk_rope_head_dim): 576 numbers in V3 instead of 2 * 128 heads * 192/128 for plain multi-head attention.
Keys and values are never expanded; W^UK is absorbed into the query and W^UV into the output:

    q_i^C . k_j^C,i = q_i^C . (W^UK_i c_j) = (W^UK_i^T q_i^C) . c_j          scores against the latent
    sum_j p_ij v_j,i = W^UV_i (sum_j p_ij c_j)                                 values from the latent

A wrapper around MLASelfAttention's own submodules (same weights, no branch in its forward); heads are this
TP rank's (the row-parallel output projection sums over TP). Sequence parallelism is a training feature and
is not supported here. Tested against the plain training path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.mla.attention import MLASelfAttention


@dataclass
class LatentKVCache:
    """One layer's compressed cache: latent [b, max_s, kv_lora], k_rope [b, max_s, d_h^R]."""
    latent: torch.Tensor
    k_rope: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, attn: MLASelfAttention, batch: int, max_seq: int, dtype=None, device=None) -> "LatentKVCache":
        w = attn.linear_kv_down_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        return cls(torch.zeros(batch, max_seq, attn.mla.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_seq, attn.mla.qk_rope_head_dim, dtype=dtype, device=device))

    def numel_per_token(self) -> int:
        return self.latent.shape[-1] + self.k_rope.shape[-1]


@torch.no_grad()
def absorbed_attention(attn: MLASelfAttention, hidden_states: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
    """hidden [s, b, h] for positions cache.length .. cache.length+s-1 -> [s, b, h]; appends to the cache."""
    if attn.sequence_parallel:
        raise NotImplementedError("absorbed_attention: sequence parallelism is not supported in inference")
    mla, n = attn.mla, attn.num_heads
    d_nope, d_rope, d_v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    s, b, _ = hidden_states.shape
    start, end = cache.length, cache.length + s
    if end > cache.latent.shape[1]:
        raise ValueError(f"LatentKVCache holds {cache.latent.shape[1]} positions, needs {end}")

    # queries: [s, b, n, d_h + d_h^R]
    if mla.q_lora_rank is None:
        q, _ = attn.linear_q_proj(hidden_states)
    else:
        q, _ = attn.linear_q_up_proj(attn.q_layernorm(attn.linear_q_down_proj(hidden_states)[0]))
    q_nope, q_rope = torch.split(q.view(s, b, n, mla.qk_head_dim), [d_nope, d_rope], dim=-1)
    # compressed kv of the new tokens: c^KV [s, b, kv_lora], k^R [s, b, d_h^R]
    kv_combined, _ = attn.linear_kv_down_proj(hidden_states)
    latent, k_rope = torch.split(kv_combined, [mla.kv_lora_rank, d_rope], dim=-1)
    latent = attn.kv_layernorm(latent)

    positions = torch.arange(start, end, device=hidden_states.device)[None].expand(b, s)
    cos, sin = attn.rotary.cos_sin(s, q.device, q.dtype, position_ids=positions)  # [s, b, 1, d_h^R/2]
    q_rope = attn.rotary(q_rope, cos, sin)
    k_rope = attn.rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)

    cache.latent[:, start:end] = latent.transpose(0, 1)
    cache.k_rope[:, start:end] = k_rope.transpose(0, 1)
    cache.length = end
    c_all, kr_all = cache.latent[:, :end], cache.k_rope[:, :end]  # [b, t, kv_lora], [b, t, d_h^R]

    # W^UK, W^UV of this rank's heads: linear_kv_up_proj.weight [n*(d_h+d_v), kv_lora] -> [n, d_h+d_v, kv_lora]
    w = attn.linear_kv_up_proj.weight.view(n, d_nope + d_v, mla.kv_lora_rank)
    w_uk, w_uv = w[:, :d_nope], w[:, d_nope:]                        # [n, d_h, c], [n, d_v, c]
    q_latent = torch.einsum("sbnd,ndc->bnsc", q_nope, w_uk)          # absorbed query [b, n, s, c]
    scores = (torch.einsum("bnsc,btc->bnst", q_latent, c_all)
              + torch.einsum("sbnr,btr->bnst", q_rope, kr_all)) * mla.softmax_scale()
    # causal: the new token at position start+i sees positions <= start+i
    allowed = torch.ones(s, end, dtype=torch.bool, device=scores.device).tril(diagonal=start)
    probs = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
    o_latent = torch.einsum("bnst,btc->sbnc", probs, c_all)         # [s, b, n, c]
    o = torch.einsum("sbnc,nvc->sbnv", o_latent, w_uv)               # [s, b, n, d_v]
    out, _ = attn.linear_proj(o.reshape(s, b, n * d_v))
    return out
