"""The trainer with --pipeline-schedule dualpipev / dualpipe on 4 gloo ranks (PP 2 x DP 2) against its own 1F1B run
(megatron-core's schedule) on the same ranks: the same losses and the same expert-bias trajectory; checkpoints
stay layout-free (saved under one schedule, resumed under another, the next step is the uninterrupted run's):
DualPipeV -> 1F1B, 1F1B -> DualPipe and DualPipeV, DualPipe -> DualPipeV.

All runs start from the same weights (build_model's init from --seed is layout-independent), so they differ
only in how the work is split. Tolerance: float32 sums in another order over 3 steps, relative 5e-5 on the loss
(test_parallel.py's; measured: DualPipeV bit-equal to 1F1B, DualPipe 2.4e-8 at step 3). The bias moves by sign(counts), so it is compared exactly.
"""
import pytest
import torch

from megatron_dsv3.testing import run_distributed
from tests.training.conftest import trainer_argv

STEPS = 3
# 4 layers: DualPipeV cuts them into 2 x PP = 4 stages; GBS 8 / (MBS 1 x DP 2) = 4 micro-batches = 2 x PP
MODEL = ["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"]


def _steps(t, n):
    from megatron_dsv3.moe.router import routers_of
    routers = routers_of([c.module for c in t.chunks])
    out = {"loss": [], "bias": []}
    for _ in range(n):
        out["loss"].append(t.train_step()["loss"])
        out["bias"].append({r.layer_number: r.expert_bias.clone() for _, r in routers})
    return out


def _extend(a, b):
    for k in a:
        a[k] += b[k]


def _rank(rank, prefix, cache, ck_v, ck_1, ck_d):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer

    def trainer(*extra):
        argv = trainer_argv(prefix, cache, *MODEL, *extra, iters=STEPS)
        if "--load" in extra:       # the model comes from the checkpoint
            i = argv.index("--preset")
            argv = argv[:i] + argv[i + 2:]
            i = argv.index("--num-layers")
            argv = argv[:i] + argv[i + 2:]
        return Trainer(parse_args(argv))

    res = {}
    one = trainer("--save", ck_1)          # the 1F1B run, saved after step 2
    res["1f1b"] = _steps(one, STEPS - 1)
    one.save()
    _extend(res["1f1b"], _steps(one, 1))
    v = trainer("--pipeline-schedule", "dualpipev", "--save", ck_v)
    res["dualpipev"] = _steps(v, STEPS - 1)
    v.save()
    _extend(res["dualpipev"], _steps(v, 1))
    dp = trainer("--pipeline-schedule", "dualpipe", "--save", ck_d)
    res["dualpipe"] = _steps(dp, STEPS - 1)
    dp.save()                              # the mirrored copies are saved once (the second as a non-main replica)
    _extend(res["dualpipe"], _steps(dp, 1))
    res["dp_to_v"] = _steps(trainer("--load", ck_d, "--pipeline-schedule", "dualpipev"), 1)["loss"]
    # layout-free checkpoints: DualPipeV's step 2 resumed under 1F1B, 1F1B's under DualPipe and DualPipeV
    res["v_to_1f1b"] = _steps(trainer("--load", ck_v), 1)["loss"]
    res["1f1b_to_dp"] = _steps(trainer("--load", ck_1, "--pipeline-schedule", "dualpipe"), 1)["loss"]
    res["1f1b_to_v"] = _steps(trainer("--load", ck_1, "--pipeline-schedule", "dualpipev"), 1)["loss"]
    res["placement"] = [c.module.placement.stage for c in v.chunks]
    # the chunks the schedule runs as Figure 4's overlapped pairs (overlap is on by default; megatron's DDP wraps them)
    from megatron_dsv3.pipeline.megatron_schedule import supports_overlap
    res["overlap"] = {"dualpipev": [supports_overlap(c) for c in v.chunks],
                      "dualpipe": [supports_overlap(c) for c in dp.chunks]}
    return res


def test_dualpipe_and_dualpipev_match_1f1b(tiny_data, tmp_path):
    prefix, cache = tiny_data
    results = run_distributed(_rank, 4, pp=2, prefix=prefix, cache=cache, ck_v=str(tmp_path / "v"),
                              ck_1=str(tmp_path / "one"), ck_d=str(tmp_path / "dp"), timeout=600)
    ref = results[0]["1f1b"]
    assert [r["placement"] for r in results] == [[0, 3], [0, 3], [1, 2], [1, 2]]   # PP outermost: ranks 0,1 = PP 0
    # every chunk with a MoE layer overlapped (stage 0 of DualPipeV is the dense layer alone)
    assert [r["overlap"]["dualpipev"] for r in results] == [[False, True]] * 2 + [[True, True]] * 2
    assert all(r["overlap"]["dualpipe"] == [True, True] for r in results)
    for rank, res in enumerate(results):
        for variant in ("dualpipev", "dualpipe"):
            assert res[variant]["loss"] == pytest.approx(ref["loss"], rel=5e-5), (rank, variant, res[variant]["loss"])
            for step in range(STEPS):
                for layer, b in res[variant]["bias"][step].items():
                    assert torch.equal(b, _bias_of(results, step, layer)), (rank, variant, step, layer)
        assert res["v_to_1f1b"] == pytest.approx(res["dualpipev"]["loss"][2:], rel=5e-5)
        assert res["1f1b_to_dp"] == pytest.approx(ref["loss"][2:], rel=5e-5)
        assert res["1f1b_to_v"] == pytest.approx(ref["loss"][2:], rel=5e-5)
        assert res["dp_to_v"] == pytest.approx(res["dualpipe"]["loss"][2:], rel=5e-5)
    # the bias moved (the comparison above can fail)
    assert any(not torch.equal(b, _bias_of(results, 0, layer)) for layer, b in ref["bias"][-1].items())


def _bias_of(results, step, layer):
    """The 1F1B run's bias of `layer` after `step`, from whichever rank holds that layer under 1F1B."""
    for res in results:
        if layer in res["1f1b"]["bias"][step]:
            return res["1f1b"]["bias"][step][layer]
    raise AssertionError(f"layer {layer} is on no rank under 1F1B")


@pytest.mark.parametrize("flags, message", [
    (["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "3", "--num-layers", "3"],
     r"'dualpipe' \(--pipeline-schedule\) needs an even pipeline_model_parallel_size \(--pipeline-model-parallel-size\)"),
    (["--pipeline-schedule", "dualpipev"], r"--pipeline-model-parallel-size\) >= 2, got 1"),
    (["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank",
      "2", "--num-layers", "4"], r"--pipeline-schedule dualpipev with --num-virtual-stages-per-pipeline-rank"),
    (["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2", "--num-layers", "4",
      "--overlap-grad-reduce"], r"--overlap-grad-reduce with --pipeline-schedule dualpipev"),
])
def test_schedule_flag_mistakes_are_one_line_errors(flags, message, tiny_data):
    from megatron_dsv3.training.arguments import parse_args
    prefix, cache = tiny_data
    with pytest.raises(ValueError, match=message) as e:
        parse_args(trainer_argv(prefix, cache, *flags))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant, m, message", [
    ("dualpipev", 3, r"dualpipev needs >= 2 x --pipeline-model-parallel-size \(4\) micro-batches, got "
                     r"--global-batch-size 6 / \(--micro-batch-size 2 x data-parallel size 1\) = 3"),
    ("dualpipe", 5, r"dualpipe needs an even number of micro-batches >= 2 x --pipeline-model-parallel-size \(4"),
])
def test_too_few_microbatches_name_the_flags(variant, m, message, tiny_data):
    from megatron_dsv3.training.arguments import check_world, parse_args
    prefix, cache = tiny_data
    args = parse_args(trainer_argv(prefix, cache, "--pipeline-schedule", variant, "--pipeline-model-parallel-size", "2",
                                   "--num-layers", "4", "--global-batch-size", str(2 * m)))
    with pytest.raises(ValueError, match=message):
        check_world(args, args.model_config_resolved, 2)
    check_world(args.__class__(**{**vars(args), "global_batch_size": 16}), args.model_config_resolved, 2)
