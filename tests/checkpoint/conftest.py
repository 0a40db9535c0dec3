"""Tiny Hugging Face DeepSeek-V3 checkpoints, made as the published ones are.

A random `transformers` DeepseekV3ForCausalLM is saved with save_pretrained (per-expert keys) for the
shapes; the tensors are the published checkpoint's names (written out below, independently of the mapping
table), every one randomised (norms and the router bias too, so nothing is trivially 1 or 0), including the
MTP layer HF does not build (`model.layers.{L}.*`: enorm, hnorm, eh_proj, shared_head.norm, a MoE block, and
the copies embed_tokens / shared_head.head). BF16: every tensor in bfloat16 except the router bias
(float32, as published). FP8: the linear weights of attention and MLPs quantised to e4m3 with 128x128
block scales amax/448, and quantization_config in config.json.

Sizes are chosen so FP8 blocks have partial edges (hidden 160, q_b 192 rows), TP=2 pads the vocabulary
(251 -> 252), PP=2 puts the dense layer on stage 0 and the MoE layer + MTP on stage 1, EP=2 gives 4
experts per rank.
"""
import json
import os

import pytest
import torch

from megatron_dsv3.checkpoint import mapping as M
from megatron_dsv3.checkpoint.fp8 import quantize_blockwise
from megatron_dsv3.checkpoint.safetensors_io import ShardedSafetensorsWriter

HF_KW = dict(vocab_size=251, hidden_size=160, intermediate_size=320, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
             num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=96,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=1, tie_word_embeddings=False,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


# The published DeepSeek-V3 checkpoint's tensor names (model.safetensors.index.json of deepseek-ai/DeepSeek-V3),
# written out here from its README_WEIGHTS.md and transformers' DeepseekV3 modeling code, NOT from the mapping
# table under test: a wrong row of the table then fails `random_hf_tensors` instead of round-tripping cleanly.
# (The real index could not be fetched on this machine; the names below are those of its weight_map.)
ATTN = ["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
DENSE_MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
ROUTER = ["mlp.gate.weight", "mlp.gate.e_score_correction_bias"]
SHARED = ["mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
          "mlp.shared_experts.down_proj.weight"]
MTP_OWN = ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"]
MTP_COPIES = ["embed_tokens.weight", "shared_head.head.weight"]      # equal to model.embed_tokens / lm_head
# FP8 (e4m3 + weight_scale_inv, 128x128 blocks): exactly the 2-D linear weights of attention and MLPs
FP8_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _experts(e):
    return [f"mlp.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


def published_names(num_layers, first_k_dense, num_experts, mtp_layers):
    """Every tensor name of a published-style DeepSeek-V3 checkpoint (scales excluded)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers + mtp_layers):
        pre = f"model.layers.{i}."
        moe = i >= first_k_dense
        names += [pre + n for n in ATTN + NORMS]
        if moe:
            names += [pre + n for n in ROUTER + SHARED]
            names += [pre + n for e in range(num_experts) for n in _experts(e)]
        else:
            names += [pre + n for n in DENSE_MLP]
        if i >= num_layers:                             # an MTP layer: a full decoder layer + its own + copies
            names += [pre + n for n in MTP_OWN + MTP_COPIES]
    return names


def published_fp8_names(names):
    """The names the published FP8 checkpoint quantises (not norms, router, embeddings, heads, eh_proj)."""
    return {n for n in names if n.endswith(FP8_SUFFIXES)}


def random_hf_tensors(tmp, seed=0, layers=2):
    """{HF name: float32 tensor} of a random tiny DeepSeek-V3 incl. its MTP layer, config.json, DSV3Config.
    Names: published_names; shapes: transformers' own save_pretrained (the MTP layer: those of the last
    decoder layer, plus its own projections); the table (mapping.py) must agree with both."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from safetensors import safe_open
    torch.manual_seed(seed)
    kw = dict(HF_KW, num_hidden_layers=layers)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    src = os.path.join(tmp, "save_pretrained")
    model.save_pretrained(src)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        hf_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    h, V, L = kw["hidden_size"], kw["vocab_size"], layers
    names = published_names(L, kw["first_k_dense_replace"], kw["n_routed_experts"], kw["num_nextn_predict_layers"])
    own = {"enorm.weight": (h,), "hnorm.weight": (h,), "shared_head.norm.weight": (h,), "eh_proj.weight": (h, 2 * h),
           "embed_tokens.weight": (V, h), "shared_head.head.weight": (V, h)}

    def shape(name):
        if name in hf_shapes:
            return hf_shapes[name]
        rest = name.split(".", 3)[3]                                       # model.layers.{L}.<rest>
        return own[rest] if rest in own else hf_shapes[f"model.layers.{L - 1}.{rest}"]

    from megatron_dsv3.config import DSV3Config
    cfg = DSV3Config.from_hf(config)
    table = M.expected_hf_shapes(cfg)
    assert set(names) == set(table), f"the mapping table differs from the published names: {set(names) ^ set(table)}"
    assert {n: shape(n) for n in names} == {n: tuple(s) for n, s in table.items()}
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name in names:
        if name.endswith(tuple(MTP_COPIES)) and f".{L}." in name:
            continue
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape(name), generator=g)
        else:
            tensors[name] = 0.05 * torch.randn(shape(name), generator=g)
    for k in range(kw["num_nextn_predict_layers"]):                     # the MTP layer's copies
        tensors[f"model.layers.{L + k}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        tensors[f"model.layers.{L + k}.shared_head.head.weight"] = tensors["lm_head.weight"]
    return tensors, config, cfg


def write_hf(path, tensors, config, fp8=False, max_shard_bytes=400_000, dtype=torch.bfloat16):
    """Write as published: BF16 (bias F32), or FP8 blocks for the quantised names; 2+ shards with an index.
    dtype float32: a float32 checkpoint (config.json torch_dtype "float32")."""
    quantised = published_fp8_names(tensors) if fp8 else set()
    if fp8:
        config = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                                   "quant_method": "fp8", "weight_block_size": [128, 128]})
    name = str(dtype).replace("torch.", "")
    config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    config = dict(config, dtype=name) if dtype == torch.bfloat16 else dict(config, torch_dtype=name)
    os.makedirs(path, exist_ok=True)
    w = ShardedSafetensorsWriter(path, max_shard_bytes)
    for name in sorted(tensors):
        t = tensors[name]
        if name in quantised:
            q, s = quantize_blockwise(t)
            w.add(name, q)
            w.add(name + "_scale_inv", s)
        else:
            w.add(name, t.float() if name.endswith("e_score_correction_bias") else t.to(dtype))
    w.finish()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """{"bf16": dir, "fp8": dir, "tensors": float32 originals, "config": DSV3Config}."""
    root = tmp_path_factory.mktemp("hf_tiny")
    tensors, config, cfg = random_hf_tensors(str(root))
    return {"bf16": write_hf(str(root / "bf16"), tensors, config),
            "fp8": write_hf(str(root / "fp8"), tensors, config, fp8=True),
            "tensors": tensors, "config": cfg, "root": str(root)}
