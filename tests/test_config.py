"""Configs: presets carry the paper's numbers, bad input fails at construction with a message naming
the fields, and Hugging Face config.json files round-trip."""
import dataclasses
import json
import os
import re

import pytest

from megatron_dsv3 import DSV3Config
from megatron_dsv3.config import MLAConfig, MoEConfig, YaRNConfig, piecewise

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_configs")


def _hf(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def test_dsv3_671b_is_the_papers_architecture():
    c = DSV3Config.from_preset("dsv3-671b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.vocab_size) == (61, 7168, 128, 129280)
    m, e = c.mla, c.moe
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (e.num_shared_experts, e.num_experts, e.top_k, e.n_group, e.topk_group) == (1, 256, 8, 8, 4)
    assert (e.first_k_dense_replace, e.dense_ffn_hidden_size, e.expert_ffn_hidden_size) == (3, 18432, 2048)
    assert c.mtp.num_layers == 1
    assert c.moe.bias_rate_at(0) == 1e-3 and c.moe.bias_rate_at(14.5e12) == 0.0
    assert c.mtp.loss_weight_at(1e12) == 0.3 and c.mtp.loss_weight_at(11e12) == 0.1


@pytest.mark.parametrize("preset, total, activated, mtp, tol", [
    # paper: 671B total, 37B activated; the MTP module adds ~11.5B of its own weights (the published
    # checkpoint's 685B = 671B + 14B counts embedding and head again inside the MTP layer)
    ("dsv3-671b", 671e9, 37e9, 11.5e9, 0.02),
    # DeepSeek-V2-Lite: 15.7B total, 2.4B activated (its paper counts activated without the embedding)
    ("dsv2-lite", 15.7e9, None, 0, 0.03),  # 15.71B and 2.45B here; the paper rounds to 2.4B
])
def test_parameter_counts(preset, total, activated, mtp, tol):
    n = DSV3Config.from_preset(preset).parameter_counts()
    assert abs(n["total"] - total) / total < tol, n
    if activated:
        assert abs(n["activated"] - activated) / activated < tol, n
    else:
        assert abs(n["activated_non_embedding"] - 2.4e9) / 2.4e9 < tol, n
    assert (n["mtp"] == 0) if mtp == 0 else abs(n["mtp"] - mtp) / mtp < tol, n


def test_tiny_has_every_feature_and_proxy_fits_one_gpu():
    t = DSV3Config.from_preset("tiny")
    assert t.num_layers - t.moe.first_k_dense_replace >= 2 and t.moe.first_k_dense_replace >= 1
    assert t.moe.n_group > 1 and 1 < t.moe.topk_group < t.moe.n_group and t.moe.num_shared_experts >= 1
    assert t.mtp.num_layers >= 1 and t.mla.yarn is not None and t.mla.q_lora_rank is not None
    p = DSV3Config.from_preset("proxy-1gpu").parameter_counts()
    assert 2e9 <= p["total_with_mtp"] <= 4e9


BAD = [
    # (overrides on the tiny preset, regex the message must match)
    (dict(moe={"num_experts": 9}), r"num_experts \(9\) must be divisible by n_group \(4\)"),
    (dict(parallel={"expert_model_parallel_size": 3}), r"num_experts \(8\).*expert_model_parallel_size \(3\)"),
    (dict(moe={"topk_group": 5}), r"topk_group \(5\) must be <= n_group \(4\)"),
    (dict(moe={"top_k": 9}), r"top_k \(9\) must be <= num_experts \(8\)"),
    (dict(moe={"top_k": 5}), r"top_k \(5\) is not reachable within topk_group \(2\)"),
    (dict(moe={"group_score_topk": 3}), r"group_score_topk \(3\) must be <= experts per group \(2\)"),
    (dict(parallel={"tensor_model_parallel_size": 3}), r"num_attention_heads \(4\).*tensor_model_parallel_size \(3\)"),
    (dict(parallel={"pipeline_model_parallel_size": 2}), r"num_layers \(3\) cannot be placed on pipeline_model_parallel_size \(2\)"),
    (dict(parallel={"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 1,
                    "num_layers_in_last_pipeline_stage": 1}), r"num_layers \(3\) != num_layers_in_first"),
    (dict(mla={"yarn": {"factor": 0.5}}), r"YaRNConfig.factor must be >= 1"),
    (dict(mla={"yarn": {"beta_fast": 1, "beta_slow": 2}}), r"beta_fast > beta_slow"),
    (dict(hidden_size=-8), r"hidden_size must be > 0"),
    (dict(mla={"kv_lora_rank": 0}), r"MLAConfig.kv_lora_rank must be > 0"),
    (dict(mla={"qk_rope_head_dim": 7}), r"qk_rope_head_dim must be even"),
    (dict(moe={"expert_ffn_hidden_size": -1}), r"expert_ffn_hidden_size must be > 0"),
    (dict(moe={"first_k_dense_replace": 4}), r"first_k_dense_replace \(4\) must be <= num_layers \(3\)"),
    (dict(moe={"score_function": "relu"}), r"score_function must be 'sigmoid' or 'softmax'"),
    (dict(moe={"bias_update_rate": ((10, 1e-3),)}), r"bias_update_rate must start at 0"),
    (dict(mtp={"loss_weight": ((0, 0.3), (0, 0.1))}), r"loss_weight starts must increase strictly"),
    (dict(mtp={"num_layers": -1}), r"MTPConfig.num_layers must be >= 0"),
    # not available yet (issue 10): refused, never silently ignored
    (dict(fp8={"enabled": True, "act_tile": 64}), r"FP8Config.enabled needs act_tile = weight_block = 128"),
    (dict(fp8={"bf16_modules": ("embedding", "output_layer", "router", "norm", "core_attention", "mlp")}),
     r"FP8Config.bf16_modules: unknown module\(s\) \['mlp'\]"),
    (dict(fp8={"bf16_modules": ("embedding", "output_layer", "router", "norm")}),
     r"FP8Config.bf16_modules must keep \['core_attention'\]"),
    (dict(parallel={"pipeline_schedule": "dualpipe"}), r"pipeline_schedule 'dualpipe' .* >= 2, got 1"),
    (dict(parallel={"pipeline_schedule": "dualpipe", "pipeline_model_parallel_size": 3}),
     r"pipeline_schedule 'dualpipe' .* needs an even pipeline_model_parallel_size"),
    (dict(parallel={"pipeline_schedule": "dualpipev", "pipeline_model_parallel_size": 2,
                    "virtual_pipeline_model_parallel_size": 2}),
     r"pipeline_schedule 'dualpipev' .* leave virtual_pipeline_model_parallel_size"),
    (dict(parallel={"pipeline_schedule": "interleaved"}), r"'interleaved' .* needs virtual_pipeline_model_parallel_size"),
    (dict(parallel={"pipeline_schedule": "dualpipev", "pipeline_model_parallel_size": 2}),
     r"num_layers \(3\) cannot be placed on 2 x pipeline_model_parallel_size \(2\) stages"),
    (dict(parallel={"expert_tensor_parallel_size": 2}), r"expert_tensor_parallel_size > 1 is not available yet \(got 2\)"),
    (dict(parallel={"context_parallel_size": 2}), r"context_parallel_size > 1 is not available yet \(got 2\)"),
    (dict(fp8={"backend": "cublas"}), r"FP8Config.backend must be auto\|te\|native"),
    (dict(parallel={"sequence_parallel": True}), r"sequence_parallel needs tensor_model_parallel_size > 1"),
    (dict(parallel={"pipeline_schedule": "gpipe"}), r"pipeline_schedule must be"),
    (dict(params_dtype="int8"), r"params_dtype must be"),
    (dict(moe={"dense_ffn_hidden_size": 255}, parallel={"tensor_model_parallel_size": 2}),
     r"dense_ffn_hidden_size \(255\) must be divisible by ParallelConfig.tensor_model_parallel_size \(2\)"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_fail_at_construction_naming_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        DSV3Config.from_preset("tiny", **overrides)


def _leaf_fields(overrides):
    """The field names a bad config sets: {"moe": {"top_k": 9}} -> ["top_k"]."""
    out = []
    for k, v in overrides.items():
        out += _leaf_fields(v) if isinstance(v, dict) else [k]
    return out


def test_every_bad_config_names_the_fields_it_sets():
    """At least twenty kinds of bad input, and each one's message names every field the override sets
    (derived from the overrides, not from the expected regexes)."""
    assert len(BAD) >= 20
    for overrides, _ in BAD:
        with pytest.raises(ValueError) as e:
            DSV3Config.from_preset("tiny", **overrides)
        msg = str(e.value)
        missing = [f for f in _leaf_fields(overrides) if f not in msg]
        assert not missing, (overrides, msg, missing)


def test_fp8_training_accepted_on_any_shape():
    """--fp8 trains (issue 12): FP8Config.enabled is accepted, also on shapes off the 128 grid (tiny: expert width 64),
    which get partial tiles; param_fp8 alone (FP8 checkpoints) stays valid; bf16_modules adds FP8-capable modules."""
    c = DSV3Config.from_preset("tiny", fp8={"enabled": True})
    assert c.fp8.enabled and c.fp8.backend == "auto" and c.moe.expert_ffn_hidden_size % 128
    assert c.fp8.bf16_modules == ("embedding", "output_layer", "router", "norm", "core_attention")
    c = DSV3Config.from_preset("tiny", fp8={"param_fp8": True, "act_tile": 96})
    assert c.fp8.param_fp8 and not c.fp8.enabled
    c = DSV3Config.from_preset("tiny", fp8={"enabled": True, "bf16_modules": c.fp8.bf16_modules + ("linear_proj",)})
    assert DSV3Config.from_dict(c.to_dict()) == c


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'dsv4'; known presets: dsv2-lite, dsv3-671b, proxy-1gpu, tiny"):
        DSV3Config.from_preset("dsv4")


def test_replace_and_dict_round_trip():
    c = DSV3Config.from_preset("tiny", moe={"top_k": 4}, parallel={"tensor_model_parallel_size": 2})
    assert c.moe.top_k == 4 and c.parallel.tensor_model_parallel_size == 2 and c.moe.num_experts == 8
    assert DSV3Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert piecewise(((0, 1.0), (10, 2.0), (20, 3.0)), 15) == 2.0


@pytest.mark.parametrize("fixture", ["deepseek-v3.json", "deepseek-v2-lite.json"])
def test_hf_config_round_trips(fixture, tmp_path):
    d = _hf(fixture)
    c = DSV3Config.from_hf(d)
    assert c.to_hf() == d
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert DSV3Config.from_hf(tmp_path) == c  # a directory holding config.json


def test_hf_config_reads_the_architecture():
    v3 = DSV3Config.from_hf(_hf("deepseek-v3.json"))
    paper = DSV3Config.from_preset("dsv3-671b")
    # the architecture; recomputation is a training choice of the preset (section 3.2.2), not in config.json
    assert v3.mla == dataclasses.replace(paper.mla, recompute_up_proj=False) and v3.mtp.num_layers == 1
    for f in ("num_experts", "num_shared_experts", "top_k", "n_group", "topk_group", "routed_scaling_factor",
              "first_k_dense_replace", "score_function", "norm_topk_prob", "expert_bias"):
        assert getattr(v3.moe, f) == getattr(paper.moe, f), f
    assert v3.fp8.param_fp8 and v3.fp8.weight_block == 128
    assert v3.parameter_counts()["total"] == paper.parameter_counts()["total"]
    lite = DSV3Config.from_hf(_hf("deepseek-v2-lite.json"))
    assert lite.mla.q_lora_rank is None and lite.moe.score_function == "softmax" and not lite.moe.expert_bias
    assert lite.mla.yarn.mscale == 0.707 and lite.moe.num_shared_experts == 2
    # the HF config of transformers' rope_parameters spelling reads the same
    d = _hf("deepseek-v3.json")
    d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_type="yarn", rope_theta=10000.0)
    d.pop("rope_theta")
    assert DSV3Config.from_hf(d).mla == dataclasses.replace(paper.mla, recompute_up_proj=False)


def test_hf_config_of_another_model_is_refused():
    with pytest.raises(ValueError, match=r"model_type 'llama'.*DeepSeek-V2/V3"):
        DSV3Config.from_hf({"model_type": "llama", "hidden_size": 8})


def test_to_hf_without_source_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    d = DSV3Config.from_preset("tiny").to_hf()
    hf = transformers.DeepseekV3Config(**d)
    assert hf.n_routed_experts == 8 and hf.q_lora_rank == 64 and hf.num_nextn_predict_layers == 1
    assert DSV3Config.from_hf(d).mla == DSV3Config.from_preset("tiny").mla


def test_transformer_config_bridge():
    c = DSV3Config.from_preset("tiny")
    tc = c.to_transformer_config()
    assert tc.multi_latent_attention and tc.q_lora_rank == 64 and tc.kv_lora_rank == 32
    assert (tc.qk_head_dim, tc.qk_pos_emb_head_dim, tc.v_head_dim) == (32, 16, 32)
    assert tc.num_moe_experts == 8 and tc.moe_router_topk == 2 and tc.moe_layer_freq == [0, 1, 1]
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.rotary_scaling_factor == 4 and tc.original_max_position_embeddings == 256


def test_deepseek_v2_group_limited_greedy_round_trips():
    # DeepSeek-V2 (236B) routes with group_limited_greedy: a group's score is its max affinity
    d = dict(_hf("deepseek-v2-lite.json"), n_group=8, topk_group=3, topk_method="group_limited_greedy",
             n_routed_experts=160, num_experts_per_tok=6)
    c = DSV3Config.from_hf(d)
    assert (c.moe.n_group, c.moe.topk_group, c.moe.group_score_topk, c.moe.expert_bias) == (8, 3, 1, False)
    assert c.to_hf() == d


def _without(*keys):
    return lambda d: [d.pop(k) for k in keys]


def _set(**kv):
    return lambda d: d.update(kv)


def _rope(**kv):
    return lambda d: d["rope_scaling"].update(kv)


HF_BAD = [
    # (edit of the published V3 config.json, the whole message): the keys as the file spells them, one line
    (_without("n_routed_experts", "kv_lora_rank"), "missing required key(s): kv_lora_rank, n_routed_experts"),
    (lambda d: d["rope_scaling"].pop("factor"), "missing required key(s): rope_scaling.factor"),
    (_set(hidden_size="256"), "hidden_size must be an integer, got '256'"),
    (_set(q_lora_rank=1536.5), "q_lora_rank must be an integer or null, got 1536.5"),
    (_set(rms_norm_eps="1e-6"), "rms_norm_eps must be a number, got '1e-6'"),
    (_set(norm_topk_prob="true"), "norm_topk_prob must be true or false, got 'true'"),
    (_rope(original_max_position_embeddings="4k"), "rope_scaling.original_max_position_embeddings must be an integer, got '4k'"),
    (_set(torch_dtype="int8"), "torch_dtype must be one of bfloat16, float16, float32, float64, got 'int8'"),
    (_set(dtype="float32"), "dtype ('float32') and torch_dtype ('bfloat16') disagree"),
    # values our configs refuse, named by their config.json keys
    (_set(num_experts_per_tok=300), "num_experts_per_tok (300) must be <= n_routed_experts (256)"),
    (_set(n_group=7), "n_routed_experts (256) must be divisible by n_group (7)"),
    (_set(topk_group=9), "topk_group (9) must be <= n_group (8)"),
    (_set(first_k_dense_replace=99), "first_k_dense_replace (99) must be <= num_hidden_layers (61)"),
    (_set(qk_rope_head_dim=63), "qk_rope_head_dim must be even (rope rotates pairs), got 63"),
    (_set(hidden_size=-1), "hidden_size must be > 0, got -1"),
    (_set(num_nextn_predict_layers=-1), "num_nextn_predict_layers must be >= 0, got -1"),
    (_rope(factor=0.5), "rope_scaling.factor must be >= 1 (it scales the context), got 0.5"),
    (_set(moe_intermediate_size=0), "moe_intermediate_size must be > 0, got 0"),
]


@pytest.mark.parametrize("edit, message", HF_BAD, ids=[m[:40] for _, m in HF_BAD])
def test_bad_hf_config_names_the_json_keys(edit, message):
    d = _hf("deepseek-v3.json")
    edit(d)
    with pytest.raises(ValueError) as e:      # never KeyError / TypeError
        DSV3Config.from_hf(d)
    assert str(e.value) == "config.json: " + message


def test_hf_config_dtype():
    """params_dtype from config.json: torch_dtype, or dtype as transformers 5 writes it; bfloat16 when neither."""
    d = _hf("deepseek-v3.json")
    assert DSV3Config.from_hf(d).params_dtype == "bfloat16"
    for key, value in (("torch_dtype", "float32"), ("dtype", "float32"), ("dtype", "float16")):
        e = {k: v for k, v in d.items() if k != "torch_dtype"}
        e[key] = value
        c = DSV3Config.from_hf(e)
        assert c.params_dtype == value and c.to_hf() == e, key   # written back under the file's own key
    none = {k: v for k, v in d.items() if k != "torch_dtype"}
    assert DSV3Config.from_hf(none).params_dtype == "bfloat16"
    # without a source file to_hf writes the build dtype, so a config survives the trip through config.json
    tiny = DSV3Config.from_preset("tiny")
    assert tiny.to_hf()["torch_dtype"] == "float32" and DSV3Config.from_hf(tiny.to_hf()).params_dtype == "float32"
