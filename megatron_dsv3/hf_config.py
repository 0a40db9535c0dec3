"""Hugging Face DeepSeek-V2/V3 `config.json` <-> DSV3Config.

Fields we model are read into the feature configs; every other field is kept verbatim in
`DSV3Config.hf_extra`, so `to_hf(from_hf(d)) == d` for the published files.
"""
from __future__ import annotations

import json
import re
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
    "torch_dtype", "dtype",
}
_KNOWN_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")

# config.json keys, by the type their value must have
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size", "intermediate_size")
_INT = _REQUIRED + ("max_position_embeddings", "first_k_dense_replace", "num_nextn_predict_layers")
_INT_OR_NULL = ("q_lora_rank", "n_shared_experts", "n_group", "topk_group")
_NUMBER = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "aux_loss_alpha", "attention_dropout")
_BOOL = ("rope_interleave", "norm_topk_prob")
_STR = ("scoring_func", "topk_method")
_YARN_REQUIRED = ("factor", "original_max_position_embeddings")
_DTYPES = ("bfloat16", "float16", "float32", "float64")   # torch_dtype / dtype values we build in

# our config fields, as our configs' error messages spell them -> the config.json key the value came from
# ("{rope}" is rope_scaling or rope_parameters, as the file spells it)
HF_KEYS = {
    "num_layers": "num_hidden_layers", "norm_eps": "rms_norm_eps",
    "MLAConfig.q_lora_rank": "q_lora_rank", "MLAConfig.kv_lora_rank": "kv_lora_rank",
    "MLAConfig.qk_nope_head_dim": "qk_nope_head_dim", "MLAConfig.qk_rope_head_dim": "qk_rope_head_dim",
    "MLAConfig.v_head_dim": "v_head_dim", "MLAConfig.rope_theta": "rope_theta",
    "MLAConfig.attention_dropout": "attention_dropout",
    "YaRNConfig.factor": "{rope}.factor", "YaRNConfig.original_max_position_embeddings":
        "{rope}.original_max_position_embeddings", "beta_fast": "{rope}.beta_fast", "beta_slow": "{rope}.beta_slow",
    "YaRNConfig.mscale": "{rope}.mscale", "YaRNConfig.mscale_all_dim": "{rope}.mscale_all_dim",
    "num_experts": "n_routed_experts", "MoEConfig.num_experts": "n_routed_experts",
    "MoEConfig.num_shared_experts": "n_shared_experts", "MoEConfig.top_k": "num_experts_per_tok",
    "top_k": "num_experts_per_tok", "MoEConfig.expert_ffn_hidden_size": "moe_intermediate_size",
    "MoEConfig.dense_ffn_hidden_size": "intermediate_size", "MoEConfig.first_k_dense_replace": "first_k_dense_replace",
    "MoEConfig.n_group": "n_group", "MoEConfig.topk_group": "topk_group",
    "MoEConfig.routed_scaling_factor": "routed_scaling_factor", "MoEConfig.score_function": "scoring_func",
    "MoEConfig.seq_aux_loss_coeff": "aux_loss_alpha", "MTPConfig.num_layers": "num_nextn_predict_layers",
    "FP8Config.act_tile": "quantization_config.weight_block_size", "FP8Config.weight_block":
        "quantization_config.weight_block_size",
}
_HF_NAME = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(HF_KEYS, key=len, reverse=True))
                      + r")(?!\w)")


def _in_hf_terms(msg: str, rope_key: str) -> str:
    """One of our configs' messages with our field names replaced by the config.json keys they came from
    (DSV3Config's own fields are spelled as in config.json, but for num_layers and norm_eps)."""
    msg = re.sub(r"\bDSV3Config\.", "", msg)
    return _HF_NAME.sub(lambda m: HF_KEYS[m.group(1)].replace("{rope}", rope_key), msg)


def _bad(msg: str) -> ValueError:
    return ValueError(f"config.json: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(d: Dict[str, Any], rope_key: str) -> None:
    """Every key we read has the JSON type we read it as; a missing required key is named (never KeyError)."""
    missing = [k for k in _REQUIRED if d.get(k) is None]
    rope = d.get(rope_key)
    if rope is not None and not isinstance(rope, dict):
        raise _bad(f"{rope_key} must be an object, got {rope!r}")
    if rope and rope.get("type", rope.get("rope_type")) == "yarn":
        missing += [f"{rope_key}.{k}" for k in _YARN_REQUIRED if rope.get(k) is None]
    if missing:
        raise _bad(f"missing required key(s): {', '.join(missing)}")
    for keys, ok, what, null in ((_INT, _is_int, "an integer", False), (_INT_OR_NULL, _is_int, "an integer", True),
                                 (_NUMBER, _is_number, "a number", False), (_BOOL, lambda v: isinstance(v, bool),
                                 "true or false", False), (_STR, lambda v: isinstance(v, str), "a string", False)):
        for k in keys:
            if k in d and not ok(d[k]) and not (null and d[k] is None):
                raise _bad(f"{k} must be {what}{' or null' if null else ''}, got {d[k]!r}")
    for k in ("original_max_position_embeddings",):
        if rope and k in rope and not _is_int(rope[k]):
            raise _bad(f"{rope_key}.{k} must be an integer, got {rope[k]!r}")
    for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta"):
        if rope and rope.get(k) is not None and not _is_number(rope[k]):
            raise _bad(f"{rope_key}.{k} must be a number, got {rope[k]!r}")
    q = d.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise _bad(f"quantization_config must be an object, got {q!r}")
    if q and q.get("quant_method") == "fp8" and "weight_block_size" in q:
        blk = q["weight_block_size"]
        if not (isinstance(blk, list) and len(blk) == 2 and all(_is_int(x) for x in blk)):
            raise _bad(f"quantization_config.weight_block_size must be two integers, got {blk!r}")


def _dtype_from(d: Dict[str, Any]) -> str:
    """params_dtype: config.json's dtype (transformers 5) or torch_dtype; bfloat16 when it names none
    (as Megatron-Bridge and transformers' torch_dtype="auto")."""
    named = {k: d[k] for k in ("dtype", "torch_dtype") if d.get(k) is not None}
    for k, v in named.items():
        if v not in _DTYPES:
            raise _bad(f"{k} must be one of {', '.join(_DTYPES)}, got {v!r}")
    if len(set(named.values())) > 1:
        raise _bad(f"dtype ({named['dtype']!r}) and torch_dtype ({named['torch_dtype']!r}) disagree")
    return next(iter(named.values()), "bfloat16")


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
    """A DSV3Config from config.json contents. Every problem is a one-line ValueError naming the keys as the
    file spells them: missing keys, wrong types, and impossible values our configs refuse."""
    mt = d.get("model_type")
    if mt not in _KNOWN_TYPES:
        raise ValueError(f"config.json has model_type {mt!r}; expected one of {_KNOWN_TYPES} (DeepSeek-V2/V3)")
    rope_key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
    _check_types(d, rope_key)
    params_dtype = _dtype_from(d)
    try:
        return _build(cls, d, mt, rope_key, params_dtype)
    except ValueError as e:
        msg = str(e)
        raise _bad(_in_hf_terms(msg, rope_key)) if not msg.startswith("config.json") else e


def _build(cls, d: Dict[str, Any], mt: str, rope_key: str, params_dtype: str):
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
                    group_score_topk=1 if topk_method == "group_limited_greedy" else min(2, max(1, E // n_group_eff)),
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
               params_dtype=params_dtype, make_vocab_size_divisible_by=1, name=f"hf:{mt}",
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
    # the build dtype under the key(s) the source used (transformers 5 writes dtype), else the published torch_dtype
    for k in [k for k in ("torch_dtype", "dtype") if k in src] or ["torch_dtype"]:
        out[k] = cfg.params_dtype
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
