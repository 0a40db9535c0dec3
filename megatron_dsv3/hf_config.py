"""Hugging Face DeepSeek-V2/V3 `config.json` <-> DSV3Config.

Fields we model are read into the feature configs; every other field is kept verbatim in
`DSV3Config.hf_extra`, so `to_hf(from_hf(d)) == d` for the published files.
"""
from __future__ import annotations

import json
from typing import Any, Dict

from megatron_dsv3.config import FP8Config, MLAConfig, MoEConfig, MTPConfig, YaRNConfig

# HF keys we read into our configs (everything else goes to hf_extra)
_MODELLED = {
    "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta",
    "rope_scaling", "rope_parameters", "rope_interleave", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "first_k_dense_replace", "n_group",
    "topk_group", "routed_scaling_factor", "scoring_func", "topk_method", "norm_topk_prob",
    "num_nextn_predict_layers", "quantization_config", "model_type", "aux_loss_alpha", "attention_dropout",
}
_KNOWN_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")


def _yarn_from(rope: Dict[str, Any]):
    if not rope:
        return None, None
    kind = rope.get("type", rope.get("rope_type"))
    theta = rope.get("rope_theta")
    if kind in (None, "default"):
        return None, theta
    if kind != "yarn":
        raise ValueError(f"config.json rope scaling type {kind!r} is not supported (DeepSeek-V2/V3 use 'yarn')")
    return YaRNConfig(factor=float(rope["factor"]),
                      original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                      beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)),
                      mscale=float(rope.get("mscale", 0.0)), mscale_all_dim=float(rope.get("mscale_all_dim", 0.0))), theta


def config_from_hf(cls, d: Dict[str, Any]):
    mt = d.get("model_type")
    if mt not in _KNOWN_TYPES:
        raise ValueError(f"config.json has model_type {mt!r}; expected one of {_KNOWN_TYPES} (DeepSeek-V2/V3)")
    rope_key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
    yarn, theta = _yarn_from(d.get(rope_key) or {})
    theta = d.get("rope_theta", theta if theta is not None else 10000.0)
    topk_method = d.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy")
    scoring = d.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax")
    n_group = d.get("n_group") or 1
    if topk_method == "greedy":          # no group limit in the selection
        n_group_eff, topk_group_eff = 1, 1
    else:
        n_group_eff, topk_group_eff = n_group, d.get("topk_group") or 1
    E = d["n_routed_experts"]
    mla = MLAConfig(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                    qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
                    v_head_dim=d["v_head_dim"], rope_theta=float(theta),
                    rope_interleave=bool(d.get("rope_interleave", True)), yarn=yarn,
                    attention_dropout=float(d.get("attention_dropout", 0.0)))
    moe = MoEConfig(num_experts=E, num_shared_experts=d.get("n_shared_experts") or 0,
                    top_k=d["num_experts_per_tok"], expert_ffn_hidden_size=d["moe_intermediate_size"],
                    dense_ffn_hidden_size=d["intermediate_size"],
                    first_k_dense_replace=d.get("first_k_dense_replace", 0),
                    n_group=n_group_eff, topk_group=topk_group_eff,
                    # V3 (noaux_tc) scores a group by its top-2 sum; V2's group_limited_greedy by its max
                    group_score_topk=1 if topk_method == "group_limited_greedy" else min(2, E // n_group_eff),
                    routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                    score_function=scoring, norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                    expert_bias=topk_method == "noaux_tc",
                    seq_aux_loss_coeff=float(d.get("aux_loss_alpha", 1e-4)))
    q = d.get("quantization_config")
    fp8 = FP8Config()
    if q and q.get("quant_method") == "fp8":
        blk = q.get("weight_block_size", [128, 128])
        fp8 = FP8Config(enabled=False, weight_block=int(blk[0]), act_tile=int(blk[1]), param_fp8=True)
    extra = {k: v for k, v in d.items() if k not in _MODELLED}
    # remember exactly how the source spelled what we normalised, so to_hf reproduces it
    extra["__hf_source__"] = json.dumps({k: d[k] for k in _MODELLED if k in d}, sort_keys=True)
    return cls(num_layers=d["num_hidden_layers"], hidden_size=d["hidden_size"],
               num_attention_heads=d["num_attention_heads"], vocab_size=d["vocab_size"],
               max_position_embeddings=d.get("max_position_embeddings", 4096), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
               mla=mla, moe=moe, mtp=MTPConfig(num_layers=int(d.get("num_nextn_predict_layers", 0) or 0)), fp8=fp8,
               params_dtype="bfloat16", make_vocab_size_divisible_by=1, name=f"hf:{mt}",
               hf_extra=tuple(sorted(extra.items())))


def config_to_hf(cfg) -> Dict[str, Any]:
    """A config.json dict. Fields the source file had are written as it spelled them, when the
    modelled values still agree with it; otherwise (or without a source) in DeepSeek-V3's spelling."""
    extra = dict(cfg.hf_extra)
    src = json.loads(extra.pop("__hf_source__", "{}"))
    m, moe = cfg.mla, cfg.moe
    v3 = src.get("model_type", "deepseek_v3") != "deepseek_v2"
    out: Dict[str, Any] = {
        "model_type": src.get("model_type", "deepseek_v3"),
        "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
        "num_key_value_heads": cfg.num_attention_heads,  # MLA has no KV-head sharing; HF defaults it to 128
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "rope_theta": m.rope_theta,
        "n_routed_experts": moe.num_experts, "n_shared_experts": moe.num_shared_experts,
        "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_ffn_hidden_size,
        "intermediate_size": moe.dense_ffn_hidden_size, "first_k_dense_replace": moe.first_k_dense_replace,
        "n_group": moe.n_group, "topk_group": moe.topk_group, "routed_scaling_factor": moe.routed_scaling_factor,
        "scoring_func": moe.score_function, "topk_method": ("noaux_tc" if moe.expert_bias else
                        "group_limited_greedy" if moe.n_group > 1 else "greedy"),
        "norm_topk_prob": moe.norm_topk_prob, "aux_loss_alpha": moe.seq_aux_loss_coeff,
        "attention_dropout": m.attention_dropout,
    }
    if v3 or cfg.mtp.num_layers:
        out["num_nextn_predict_layers"] = cfg.mtp.num_layers
    if not m.rope_interleave or "rope_interleave" in src:
        out["rope_interleave"] = m.rope_interleave
    if m.yarn is not None:
        y = m.yarn
        out["rope_scaling"] = {"type": "yarn", "factor": y.factor,
                               "original_max_position_embeddings": y.original_max_position_embeddings,
                               "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                               "mscale_all_dim": y.mscale_all_dim}
    if cfg.fp8.param_fp8:
        out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [cfg.fp8.weight_block, cfg.fp8.act_tile]}
    # Where the source file spelled a value differently (int vs float, rope_parameters, greedy
    # routing with n_group 8, ...) and it means the same, keep the source's spelling.
    for k, v in src.items():
        mine = out.get(k, None)
        if k == "rope_parameters" or (k == "rope_scaling" and mine is not None and _same_rope(v, mine)):
            out.pop("rope_scaling", None)
            out[k] = v
        elif k in ("n_group", "topk_group") and out.get("topk_method") == "greedy":
            out[k] = v
        elif k == "quantization_config" and "quantization_config" in out:
            out[k] = v
        elif mine is not None and _same(mine, v):
            out[k] = v
        elif k not in out:
            out[k] = v
    out.update(extra)
    return dict(sorted(out.items()))


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _same_rope(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    return all(_same(a.get(k, b.get(k)), b.get(k)) for k in keys)
