"""LR and batch-size schedules against the paper's numbers (section 4.2), the flag -> config bridge, and the
memory estimator's bookkeeping (parameters per GPU sum to the model across the layout)."""
import math

import pytest

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.training.arguments import config_from_args, model_config_from_args, parse_args, parse_schedule
from megatron_dsv3.training.memory import estimate_memory, stage_parameters
from megatron_dsv3.training.schedules import BatchRamp, LRSchedule, num_microbatches, paper_schedule, steps_for_tokens


def test_lr_warmup_hold_cosine_tail():
    s = LRSchedule(max_lr=2.2e-4, min_lr=2.2e-5, warmup=2000, hold=100, decay=1000, style="cosine",
                   tail=((3200, 2.2e-5), (3300, 7.3e-6)))
    assert s.lr_at(0) == pytest.approx(2.2e-4 / 2000) and s.lr_at(1999) == pytest.approx(2.2e-4)
    assert s.lr_at(2050) == 2.2e-4                                  # hold
    assert s.lr_at(2100 + 500) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    assert s.lr_at(3100) == pytest.approx(2.2e-5) and s.lr_at(3250) == 2.2e-5 and s.lr_at(3400) == 7.3e-6
    lin = LRSchedule(max_lr=1.0, min_lr=0.0, warmup=0, style="linear")
    assert lin.lr_at(5, total_steps=10) == pytest.approx(0.5)
    assert LRSchedule(max_lr=1.0, style="constant", warmup=4).lr_at(100) == 1.0
    with pytest.raises(ValueError):
        LRSchedule(max_lr=1e-5, min_lr=1e-4)


def test_batch_ramp_like_megatron():
    r = BatchRamp(15360, start=3072, increment=768, ramp_samples=1600)   # 16 increments of 100 samples
    assert r.batch_size_at(0) == 3072 and r.batch_size_at(99) == 3072 and r.batch_size_at(100) == 3840
    assert r.batch_size_at(1600) == 15360 and r.batch_size_at(10 ** 9) == 15360
    assert BatchRamp(16).batch_size_at(123) == 16 and BatchRamp(16).samples_for(3) == 48
    assert num_microbatches(15360, 1, 128) == 120
    with pytest.raises(ValueError):
        num_microbatches(3000, 1, 128)
    with pytest.raises(ValueError):
        BatchRamp(15360, start=3072, increment=700, ramp_samples=10)


def test_paper_schedule_in_steps():
    s = paper_schedule(4096)
    ramp = BatchRamp(15360, *s["rampup"])
    tokens = lambda steps: ramp.samples_for(steps) * 4096
    assert s["rampup"] == (3072, 768, int(469e9 / 4096))
    assert tokens(s["warmup"] + s["hold"]) >= 10e12 > tokens(s["warmup"] + s["hold"] - 1)
    assert tokens(s["train_iters"]) >= 14.8e12 > tokens(s["train_iters"] - 1)
    assert s["tail"][0][0] == s["warmup"] + s["hold"] + s["decay"]
    # after the ramp every step is 15360 x 4096 = 62.9M tokens
    assert steps_for_tokens(BatchRamp(15360), 62_914_560 * 10, 4096) == 10


def test_flags_to_config():
    a = parse_args(["--preset", "tiny", "--num-layers", "4", "--seq-length", "2048", "--mtp-loss-weight", "0:0.3,10e12:0.1",
                    "--bias-update-rate", "0:0.001,14.3e12:0", "--rotary-scaling-factor", "40", "--beta-fast", "32",
                    "--beta-slow", "1", "--original-max-position-embeddings", "4096", "--pipeline-model-parallel-size", "2",
                    "--decoder-first-pipeline-num-layers", "1", "--expert-model-parallel-size", "2"])
    cfg = config_from_args(a)
    assert cfg.num_layers == 4 and cfg.seq_length == 2048 and cfg.max_position_embeddings == 2048
    assert cfg.mtp.loss_weight_at(11e12) == 0.1 and cfg.moe.bias_rate_at(14.4e12) == 0.0
    y = cfg.mla.yarn
    assert (y.factor, y.beta_fast, y.beta_slow, y.original_max_position_embeddings) == (40, 32, 1, 4096)
    assert cfg.pipeline_layers() == (1, 3) and cfg.params_dtype == "float32"
    assert model_config_from_args(a, on_gpu=True).params_dtype == "bfloat16"
    assert config_from_args(parse_args(["--no-yarn"])).mla.yarn is None
    assert parse_schedule("0.5") == ((0, 0.5),)


def test_memory_estimate_counts_every_parameter_once():
    cfg = DSV3Config.from_preset("dsv3-671b").replace(
        parallel={"pipeline_model_parallel_size": 16, "expert_model_parallel_size": 64,
                  "num_layers_in_first_pipeline_stage": 3, "num_layers_in_last_pipeline_stage": 2})
    pc = cfg.parameter_counts()
    dense = sum(stage_parameters(cfg, s)["dense"] for s in range(16))
    expert = sum(stage_parameters(cfg, s)["expert"] for s in range(16)) * 64       # EP shards
    # every stage's dense part once, experts once over EP; MTP's embedding copy on the last stage counted extra
    V, h = cfg.padded_vocab_size, cfg.hidden_size
    total = dense + expert - V * h
    assert total == pytest.approx(pc["total_with_mtp"] + (V - cfg.vocab_size) * h * 2, rel=1e-6)
    est = estimate_memory(cfg, micro_batch_size=1, data_parallel_size=128, moment_bytes=2)
    assert 1.5 < est["params_billion"] < 1.8 and est["weights"] == pytest.approx(est["params_billion"] * 1e9 * 2 / 2 ** 30)
    assert math.isfinite(est["total"]) and est["activations"] > est["weights"]


def test_preset_training_defaults_reach_the_model():
    """--preset tiny's training default gamma (0.01, TRAIN_DEFAULTS) is the model's bias rate; a flag wins."""
    assert config_from_args(parse_args(["--preset", "tiny"])).moe.bias_update_rate == ((0, 0.01),)
    assert config_from_args(parse_args([])).moe.bias_update_rate == ((0, 0.01),)
    assert config_from_args(parse_args(["--bias-update-rate", "0:0.002"])).moe.bias_update_rate == ((0, 0.002),)
