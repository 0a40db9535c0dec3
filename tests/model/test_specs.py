"""Decoder block / layer / MTP specs: layer kinds, pipeline-stage slices (uneven, virtual), MTP depth."""
import pytest
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.moe.layer import DeepSeekMoE
from megatron_dsv3.mla.attention import MLASelfAttention
from megatron_dsv3.norm import RMSNorm
from megatron_dsv3.specs import get_decoder_block_spec, get_layer_spec, get_mtp_block_spec


def _kinds(block):
    return ["moe" if spec.submodules.mlp.module is DeepSeekMoE else "dense" for spec in block.layer_specs]


def test_layer_spec_is_megatron_layer_with_mla_and_mlp():
    cfg = DSV3Config.from_preset("tiny")
    for moe in (False, True):
        spec = get_layer_spec(cfg, moe)
        assert spec.module is TransformerLayer
        sub = spec.submodules
        assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
        assert sub.self_attention.module is MLASelfAttention
        assert (sub.mlp.module is DeepSeekMoE) == moe


def test_all_layers_first_k_dense():
    cfg = DSV3Config.from_preset("dsv3-671b")
    block = get_decoder_block_spec(cfg, all_layers=True)
    assert _kinds(block) == ["dense"] * 3 + ["moe"] * 58 and block.layer_norm is RMSNorm


@pytest.mark.parametrize("parallel,vpp_stages", [
    ({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 1}, None),
    ({"pipeline_model_parallel_size": 3, "num_layers_in_first_pipeline_stage": 1,
      "num_layers_in_last_pipeline_stage": 1}, None),
    ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, 2),
])
def test_stage_slices_cover_the_model_in_order(parallel, vpp_stages):
    cfg = DSV3Config.from_preset("tiny").replace(num_layers=6 if vpp_stages is None else 8,
                                                 moe={"first_k_dense_replace": 2}, parallel=parallel)
    full = _kinds(get_decoder_block_spec(cfg, all_layers=True))
    pp = cfg.parallel.pipeline_model_parallel_size
    chunks = {}   # (vp, pp) -> kinds; megatron's model order is vp-major
    for rank in range(pp):
        for vp in range(vpp_stages or 1):
            chunks[(vp, rank)] = _kinds(get_decoder_block_spec(cfg, pp_rank=rank, vp_stage=vp if vpp_stages else None))
    assert sum((chunks[k] for k in sorted(chunks)), []) == full
    if vpp_stages is None:
        assert tuple(len(chunks[(0, r)]) for r in range(pp)) == cfg.pipeline_layers()


def test_mtp_block_spec_depth():
    assert get_mtp_block_spec(DSV3Config.from_preset("dsv2-lite")) is None
    spec = get_mtp_block_spec(DSV3Config.from_preset("tiny").replace(mtp={"num_layers": 3}))
    assert len(spec.submodules.layer_specs) == 3
    layer = spec.submodules.layer_specs[0].submodules.transformer_layer
    assert layer.submodules.mlp.module is DeepSeekMoE


def test_build_model_rejects_groups_unlike_the_config(mcore_single):
    from megatron_dsv3.model import build_model
    cfg = DSV3Config.from_preset("tiny").replace(parallel={"tensor_model_parallel_size": 2})
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        build_model(cfg)   # parallel_state here is TP=1


def test_moe_layers_get_the_models_process_groups(mcore_single):
    """megatron-core's TransformerLayer does not pass pg_collection to DeepSeekMoE: the spec carries the model's, so
    the bias update's balance group, the EP group and the experts' replica groups are the model's (not
    parallel_state's): checked by identity with a collection of our own."""
    import dataclasses
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.router import routers_of
    mpu = ProcessGroupCollection.use_mpu_process_groups()
    ours = ProcessGroupCollection(**{f.name: getattr(mpu, f.name) for f in dataclasses.fields(mpu)
                                     if hasattr(mpu, f.name)})
    ours.tp_dp_cp = ours.dp          # a distinct object standing for "the model's balance group"
    model = build_model(DSV3Config.from_preset("tiny"), pg_collection=ours)
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    assert len(layers) == 3                              # 2 decoder MoE layers + the MTP layer's
    assert all(r.balance_group is ours.tp_dp_cp for _, r in routers_of(model))
    assert all(m.experts.expt_dp_group is ours.expt_dp for m in layers)
