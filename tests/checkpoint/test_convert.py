"""HF <-> Megatron conversion with the real model (build_model): round trips and logits against HF.

Tiny DeepSeek-V3 (conftest.py): 2 layers (dense, MoE) + 1 MTP layer, 8 experts, FP8 blocks with partial
edges, vocabulary padded under TP=2. Two multi-process runs (4 ranks TP2xPP2xEP2 import, 4 ranks TP2xPP2xEP2
export); the rest in this process at TP=PP=EP=1.
Tolerance of the logits: 1e-4 of the largest |logit| (float32 on both sides; different summation orders).
"""
import json
import os
import tempfile

import pytest
import torch

from megatron_dsv3.checkpoint import convert as C
from megatron_dsv3.checkpoint.safetensors_io import CheckpointError, HFCheckpoint
from megatron_dsv3.checkpoint.verify import compare_logits, hf_reference_model, our_model
from megatron_dsv3.config import DSV3Config

MTP_AND_BIAS = ["model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
                "model.layers.2.shared_head.norm.weight", "model.layers.2.mlp.experts.7.down_proj.weight",
                "model.layers.2.self_attn.kv_b_proj.weight", "model.layers.2.embed_tokens.weight",
                "model.layers.2.shared_head.head.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                "model.layers.2.mlp.gate.e_score_correction_bias"]


def _read(path):
    ck = HFCheckpoint(path)          # index or a single model.safetensors
    return {k: ck.raw(k) for k in ck.keys()}


def _assert_identical(a_dir, b_dir):
    a, b = _read(a_dir), _read(b_dir)
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k
    for k in MTP_AND_BIAS:                      # MTP and router bias survive, by name and value
        assert k in b and torch.equal(a[k], b[k])
    assert b["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert b["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0
    ca = json.load(open(os.path.join(a_dir, "config.json")))
    cb = json.load(open(os.path.join(b_dir, "config.json")))
    assert DSV3Config.from_hf(ca).replace(hf_extra=()) == DSV3Config.from_hf(cb).replace(hf_extra=())
    assert {k: v for k, v in cb.items() if k in ca} == ca     # every field of the source kept as it was


@pytest.fixture(scope="module")
def mcore_from_bf16_tp2pp2ep2(hf_tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mcore") / "tp2pp2ep2")
    info = C.hf_to_mcore(hf_tiny["bf16"], out, tp=2, pp=2, ep=2, params_dtype="float32")
    assert info["world_size"] == 4 and info["layout"] == (2, 2, 2)
    return out


def test_bf16_hf_to_mcore_tp2pp2ep2_to_hf_is_bit_identical(hf_tiny, mcore_from_bf16_tp2pp2ep2, tmp_path):
    out = mcore_from_bf16_tp2pp2ep2
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read() == "release"
    assert os.path.exists(os.path.join(out, "release", "metadata.json"))
    back = str(tmp_path / "hf")
    info = C.mcore_to_hf(out, back, dtype="bf16", max_shard_bytes=500_000)     # loaded at TP=PP=EP=1
    assert info["files"] >= 2
    _assert_identical(hf_tiny["bf16"], back)


def test_fp8_hf_to_mcore_to_hf_tp2pp2ep2_export_same_bytes_and_scales(hf_tiny, tmp_path):
    mc = str(tmp_path / "mcore")
    C.hf_to_mcore(hf_tiny["fp8"], mc, params_dtype="float32")                  # 1x1x1, this process
    back = str(tmp_path / "hf")
    C.mcore_to_hf(mc, back, dtype="fp8", tp=2, pp=2, ep=2)        # 4 ranks: TP gather, PP stages, EP writers
    _assert_identical(hf_tiny["fp8"], back)
    b = _read(back)
    assert b["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert b["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 2)      # 64 x 160
    assert b["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16                     # not quantised


def test_logits_match_hf_from_dist_checkpoint_and_fp8(hf_tiny, mcore_from_bf16_tp2pp2ep2):
    """Ours (dist checkpoint written at TP2xPP2xEP2, loaded at 1x1x1; and load_hf of the FP8 files)
    against transformers' DeepseekV3ForCausalLM on the same (dequantised) weights."""
    from megatron_dsv3.testing import single_process
    with tempfile.TemporaryDirectory() as work:
        ref_bf16 = hf_reference_model(hf_tiny["bf16"], work)
        ref_fp8 = hf_reference_model(hf_tiny["fp8"], work)
        with single_process():
            model, cfg = our_model(mcore_from_bf16_tp2pp2ep2)
            r = compare_logits(ref_bf16, model, cfg.vocab_size, prompts=3, seq=24)
            assert r["max_rel"] < 1e-4 and r["kl"] < 1e-8, r
            sd = model.state_dict()
            t = hf_tiny["tensors"]
            assert torch.equal(sd["mtp.layers.0.eh_proj.weight"], t["model.layers.2.eh_proj.weight"].bfloat16().float())
            assert torch.equal(sd["decoder.layers.1.mlp.router.expert_bias"],
                               t["model.layers.1.mlp.gate.e_score_correction_bias"])

            model, cfg = our_model(hf_tiny["fp8"])                             # load_hf, dequantised on the fly
            r = compare_logits(ref_fp8, model, cfg.vocab_size, prompts=3, seq=24)
            assert r["max_rel"] < 1e-4 and r["kl"] < 1e-8, r
            ck = HFCheckpoint(hf_tiny["fp8"])
            w = model.state_dict()["mtp.layers.0.transformer_layer.mlp.experts.weight2"]
            assert torch.equal(w[5], ck.get("model.layers.2.mlp.experts.5.down_proj.weight").t())


def test_load_hf_rejects_a_different_model(hf_tiny, tmp_path):
    from megatron_dsv3.testing import single_process
    with single_process():
        cfg = C.target_config(hf_tiny["config"], params_dtype="float32").replace(moe={"expert_ffn_hidden_size": 32})
        model = C._build_model(cfg)
        with pytest.raises(CheckpointError, match=r"config.json has moe.expert_ffn_hidden_size = 64, the model 32"):
            C.load_hf(model, hf_tiny["bf16"])


def test_hf_to_mcore_bad_layout_fails_before_spawning(hf_tiny, tmp_path):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible"):
        C.hf_to_mcore(hf_tiny["bf16"], str(tmp_path / "o"), tp=3)
    assert os.listdir(tmp_path) == []


def test_deepseek_v2_without_q_lora_or_bias_loads_and_matches_hf(tmp_path):
    """The V2 rows of the table (q_proj, softmax router without bias, no MTP) against DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    from megatron_dsv3.testing import single_process
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.9, 1.1)
    hf.save_pretrained(str(tmp_path / "v2"))
    with single_process():
        model, cfg = our_model(str(tmp_path / "v2"))
        assert cfg.mla.q_lora_rank is None and not cfg.moe.expert_bias and cfg.mtp.num_layers == 0
        r = compare_logits(hf.eval(), model, cfg.vocab_size, prompts=2, seq=16)
        assert r["max_rel"] < 1e-4 and r["kl"] < 1e-8, r


def test_bad_mtp_copy_and_unknown_tensor(hf_tiny, tmp_path):
    """The MTP layer's embed_tokens copy must equal the main one; a tensor the model has no place for is refused."""
    import shutil
    from tests.checkpoint.test_safetensors_io import _rewrite
    from megatron_dsv3.testing import single_process
    src = str(tmp_path / "src")
    shutil.copytree(hf_tiny["bf16"], src)
    _rewrite(src, lambda k, t: {k: t + 1 if k == "model.layers.2.embed_tokens.weight" else t})
    with single_process():
        model = C._build_model(C.target_config(hf_tiny["config"], params_dtype="float32"))
        with pytest.raises(CheckpointError, match=r"'model.layers.2.embed_tokens.weight' differs from "
                                                  r"'model.embed_tokens.weight'"):
            C.load_hf(model, src)
    src2 = str(tmp_path / "src2")
    shutil.copytree(hf_tiny["bf16"], src2)
    _rewrite(src2, lambda k, t: {k: t, "model.layers.0.mlp.bias": t[:2]} if k == "model.norm.weight" else {k: t})
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensor\(s\) map to nothing in the model, "
                                              r"e.g. \['model.layers.0.mlp.bias'\]"):
        C.hf_to_mcore(src2, str(tmp_path / "out"), params_dtype="float32")
    assert not os.path.exists(tmp_path / "out")


def test_trainer_checkpoint_exports_to_hf(hf_tiny, tmp_path):
    """A checkpoint saved by the trainer (training/checkpointing.py: `latest`, iter_*, model0, config in
    train_state) exports like ours."""
    from megatron_dsv3.testing import single_process
    from megatron_dsv3.training.checkpointing import save_checkpoint
    cfg = C.target_config(hf_tiny["config"], params_dtype="float32")
    with single_process():
        model = C._build_model(cfg)
        C.load_hf(model, hf_tiny["bf16"])
        save_checkpoint(str(tmp_path / "run"), 7, [model], None, {"config": cfg.to_dict()})
    back = str(tmp_path / "hf")
    C.mcore_to_hf(str(tmp_path / "run"), back, dtype="bf16")
    _assert_identical(hf_tiny["bf16"], back)


def _vpp_rank(rank, path, tensors):
    from megatron_dsv3.model import build_model
    ck = HFCheckpoint(path)
    cfg = ck.config.replace(params_dtype="float32", parallel={"pipeline_model_parallel_size": 2,
                                                              "virtual_pipeline_model_parallel_size": 2,
                                                              "pipeline_schedule": "interleaved"})
    seen = []
    for v in range(2):
        chunk = build_model(cfg, vp_stage=v)
        C.load_hf(chunk, ck)
        for i, layer in enumerate(chunk.decoder.layers):
            g = layer.layer_number - 1
            w = chunk.state_dict()[f"decoder.layers.{i}.self_attention.linear_kv_up_proj.weight"]
            assert torch.equal(w, tensors[f"model.layers.{g}.self_attn.kv_b_proj.weight"].bfloat16().float()), g
            seen.append(g)
    return seen


def test_load_hf_per_virtual_pipeline_chunk(tmp_path):
    """--load-hf with interleaved stages: each chunk's layers are found by their global layer number."""
    from tests.checkpoint import conftest
    from megatron_dsv3.testing import run_distributed
    tensors, config, _ = conftest.random_hf_tensors(str(tmp_path), layers=4)
    path = conftest.write_hf(str(tmp_path / "hf"), tensors, config)
    seen = run_distributed(_vpp_rank, 2, pp=2, vpp=2, path=path,
                           tensors={k: v for k, v in tensors.items() if "kv_b_proj" in k})
    assert seen == [[0, 2], [1, 3]]            # megatron's interleaved placement


def test_checkpoint_without_mtp_layer_needs_drop_mtp(hf_tiny, tmp_path):
    """transformers' save_pretrained keeps num_nextn_predict_layers=1 but writes no MTP layer."""
    plain = os.path.join(hf_tiny["root"], "save_pretrained")
    with pytest.raises(CheckpointError, match=r"missing from the index, e.g. 'model.layers.2.*convert with "
                                              r"drop_mtp=True / --no-mtp"):
        C.hf_to_mcore(plain, str(tmp_path / "mc"))
    C.hf_to_mcore(plain, str(tmp_path / "mc"), params_dtype="float32", drop_mtp=True)
    C.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "hf"), dtype="fp32")
    a, b = _read(plain), _read(str(tmp_path / "hf"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "hf" / "config.json"))["num_nextn_predict_layers"] == 0
