"""THE name table (megatron_dsv3/checkpoint/mapping.py): coverage of published names, split round trips, stages."""
import pytest
import torch

from megatron_dsv3.checkpoint import mapping as M
from megatron_dsv3.config import DSV3Config

V3_CONFIG = "tests/fixtures/hf_configs/deepseek-v3.json"


def test_table_names_the_published_v3_tensors():
    cfg = DSV3Config.from_hf(V3_CONFIG)
    shapes = M.expected_hf_shapes(cfg)
    # 61 layers (3 dense) + 1 MTP layer, 256 experts: counts of the published index (scales excluded)
    per_dense, per_moe = 9 + 3, 9 + 2 + 3 + 256 * 3
    assert len(shapes) == 3 + 3 * per_dense + 58 * per_moe + (per_moe + 4 + 2)
    assert shapes["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert shapes["model.layers.61.shared_head.head.weight"] == (129280, 7168)
    assert shapes["model.layers.3.mlp.experts.255.down_proj.weight"] == (7168, 2048)
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (18432, 7168)
    assert shapes["model.layers.60.mlp.gate.e_score_correction_bias"] == (256,)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert "model.layers.2.mlp.gate.weight" not in shapes and "model.layers.3.mlp.gate_proj.weight" not in shapes
    fp8 = {n for r in M.model_tensors(cfg) if r.entry.fp8 for n in r.hf_names(range(256))}
    # quantised as published: attention and MLP linears; not embeddings, norms, router, head, eh_proj
    assert "model.layers.5.self_attn.kv_a_proj_with_mqa.weight" in fp8
    assert "model.layers.61.mlp.experts.7.up_proj.weight" in fp8
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.5.mlp.gate.weight",
              "model.layers.61.eh_proj.weight", "model.layers.5.input_layernorm.weight"):
        assert n not in fp8


def test_table_equals_the_published_v3_names_and_fp8_set():
    """Anchored to the published names written out independently (conftest.published_names): every name,
    and exactly the FP8-quantised ones, at the full 61 + 1 MTP layers x 256 experts."""
    from tests.checkpoint.conftest import published_fp8_names, published_names
    cfg = DSV3Config.from_hf(V3_CONFIG)
    names = published_names(61, 3, 256, 1)
    assert len(names) == len(set(names))
    assert set(M.expected_hf_shapes(cfg)) == set(names)
    fp8 = {n for r in M.model_tensors(cfg) if r.entry.fp8 for n in r.hf_names(range(256))}
    assert fp8 == published_fp8_names(names)
    assert "model.layers.61.eh_proj.weight" not in fp8 and "model.layers.61.shared_head.head.weight" not in fp8
    assert "model.layers.61.mlp.shared_experts.down_proj.weight" in fp8


def test_v2_lite_uses_q_proj_and_no_bias():
    cfg = DSV3Config.from_hf("tests/fixtures/hf_configs/deepseek-v2-lite.json")
    shapes = M.expected_hf_shapes(cfg)
    assert "model.layers.1.self_attn.q_proj.weight" in shapes and "model.layers.1.self_attn.q_a_proj.weight" not in shapes
    assert not any(n.endswith("e_score_correction_bias") for n in shapes)
    assert not any(".layers.27." in n for n in shapes)       # no MTP


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_merge_round_trip(tp):
    g = torch.Generator().manual_seed(tp)
    cases = {M.REPLICATED: [torch.randn(6, 8, generator=g)], M.COLUMN: [torch.randn(8, 6, generator=g)],
             M.ROW: [torch.randn(6, 8, generator=g)], M.VOCAB: [torch.randn(9, 4, generator=g)],
             M.GLU: [torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)]}
    for split, hf in cases.items():
        padded = 12 if split == M.VOCAB else None
        parts = [M.shard(split, hf, r, tp, padded) for r in range(tp)]
        back = M.merge(split, parts, rows=9)
        assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf)), split
    gate, up = cases[M.GLU]
    assert torch.equal(M.shard(M.GLU, [gate, up], 0, tp, None),
                       torch.cat([gate[: 8 // tp], up[: 8 // tp]]))          # megatron's [gate_r; up_r]
    assert M.shard(M.VOCAB, cases[M.VOCAB], tp - 1, tp, 12)[-1].abs().sum() == 0   # padded rows are zero


def test_expert_layout():
    g = torch.Generator().manual_seed(0)
    f, h = 3, 5
    gate, up, down = torch.randn(f, h, generator=g), torch.randn(f, h, generator=g), torch.randn(h, f, generator=g)
    w1 = M.expert_part(M.EXPERT_FC1, [gate, up])
    w2 = M.expert_part(M.EXPERT_FC2, [down])
    assert w1.shape == (h, 2 * f) and w2.shape == (f, h)
    x = torch.randn(2, h, generator=g)
    # the interface: weight1[:, :f] = gate.T, weight1[:, f:] = up.T, weight2 = down.T
    assert torch.allclose(x @ w1[:, :f], x @ gate.t()) and torch.allclose(x @ w1[:, f:], x @ up.t())
    back = M.expert_hf(M.EXPERT_FC1, w1) + M.expert_hf(M.EXPERT_FC2, w2)
    assert all(torch.equal(a, b) for a, b in zip(back, [gate, up, down]))
    cfg = DSV3Config.from_preset("tiny")
    assert list(M.local_experts(cfg, 1, 2)) == [4, 5, 6, 7]


def test_pipeline_stage_ownership_and_names():
    cfg = DSV3Config.from_preset("tiny", num_layers=5, parallel={"pipeline_model_parallel_size": 3,
                                                                 "num_layers_in_first_pipeline_stage": 1})
    assert cfg.pipeline_layers() == (1, 2, 2)
    assert [M.stage_of_layer(cfg, i) for i in range(6)] == [0, 1, 1, 2, 2, 2]   # layer 5 = MTP -> last
    assert M.global_name("decoder.layers.1.mlp.router.weight", cfg, 2) == "decoder.layers.4.mlp.router.weight"
    assert M.local_name("decoder.layers.4.mlp.router.weight", cfg, 2) == "decoder.layers.1.mlp.router.weight"
    assert M.global_name("mtp.layers.0.eh_proj.weight", cfg, 2) == "mtp.layers.0.eh_proj.weight"
    rows = M.table(cfg)
    r = rows["mtp.layers.0.transformer_layer.mlp.experts.weight1"]
    assert r.hf_names([3]) == ["model.layers.5.mlp.experts.3.gate_proj.weight",
                               "model.layers.5.mlp.experts.3.up_proj.weight"]
    assert rows["mtp.layers.0.final_layernorm.weight"].hf_names() == ["model.layers.5.shared_head.norm.weight"]
    assert rows["decoder.layers.4.mlp.router.expert_bias"].hf_names() == [
        "model.layers.4.mlp.gate.e_score_correction_bias"]
    assert M.mtp_shared_copies(cfg) == {"model.layers.5.embed_tokens.weight": "model.embed_tokens.weight",
                                        "model.layers.5.shared_head.head.weight": "lm_head.weight"}
