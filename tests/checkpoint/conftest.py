"""Tiny Hugging Face DeepSeek-V3 checkpoints, made as the published ones are.

A random `transformers` DeepseekV3ForCausalLM is saved with save_pretrained (per-expert keys), every
tensor is randomised (norms and the router bias too, so nothing is trivially 1 or 0), and the MTP layer
HF does not build (`model.layers.{L}.*`: enorm, hnorm, eh_proj, shared_head.norm, a MoE block, and the
copies embed_tokens / shared_head.head) is added. BF16: every tensor in bfloat16 except the router bias
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


def random_hf_tensors(tmp, seed=0, layers=2):
    """{HF file name: float32 tensor} of a random tiny DeepSeek-V3 incl. its MTP layer, and config.json."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from safetensors import safe_open
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(HF_KW, num_hidden_layers=layers)))
    src = os.path.join(tmp, "save_pretrained")
    model.save_pretrained(src)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    tensors = {}
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k).float()
    from megatron_dsv3.config import DSV3Config
    cfg = DSV3Config.from_hf(config)
    g = torch.Generator().manual_seed(seed + 1)
    for name, shape in M.expected_hf_shapes(cfg).items():
        if name in M.mtp_shared_copies(cfg):
            continue
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        if name in tensors:
            assert tuple(tensors[name].shape) == tuple(shape), name
        tensors[name] = t
    for copy, main in M.mtp_shared_copies(cfg).items():
        tensors[copy] = tensors[main]
    assert set(tensors) == set(M.expected_hf_shapes(cfg)), set(tensors) ^ set(M.expected_hf_shapes(cfg))
    return tensors, config, cfg


def write_hf(path, tensors, config, fp8=False, max_shard_bytes=400_000):
    """Write as published: BF16 (bias F32), or FP8 blocks for the quantised rows; 2+ shards with an index."""
    cfg_fp8 = set()
    if fp8:
        from megatron_dsv3.config import DSV3Config
        cfg = DSV3Config.from_hf(config)
        for r in M.model_tensors(cfg):
            if r.entry.fp8:
                ex = range(cfg.moe.num_experts) if r.entry.split in (M.EXPERT_FC1, M.EXPERT_FC2) else None
                cfg_fp8.update(r.hf_names(ex))
        config = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                                   "quant_method": "fp8", "weight_block_size": [128, 128]})
    config = dict(config, dtype="bfloat16")
    os.makedirs(path, exist_ok=True)
    w = ShardedSafetensorsWriter(path, max_shard_bytes)
    for name in sorted(tensors):
        t = tensors[name]
        if name in cfg_fp8:
            q, s = quantize_blockwise(t)
            w.add(name, q)
            w.add(name + "_scale_inv", s)
        else:
            w.add(name, t.float() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16))
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
