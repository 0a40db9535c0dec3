"""One short run of the trainer's whole loop: TensorBoard scalars (loss, MTP per depth, balance loss, lr, grad
norm, tokens/s, TFLOP/s, per-layer MaxVio and bias spread, validation), console lines, the greedy sample and
the expert-load summary."""
from tests.training.conftest import trainer_argv


def test_logs_sample_and_summary(mcore_single, tiny_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    prefix, cache = tiny_data
    tb = str(tmp_path / "tb")
    t = Trainer(parse_args(trainer_argv(prefix, cache, "--tensorboard-dir", tb, "--eval-interval", "2",
                                        "--eval-iters", "1", "--log-interval", "2", iters=4)))
    t.train()
    out = capsys.readouterr().out
    assert "iteration      2/4 | loss" in out and "validation loss" in out and "mtp1" in out
    ea = EventAccumulator(tb)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    need = {"train/loss", "train/lr", "train/grad_norm", "train/mtp_loss_depth1", "train/seq_balance_loss",
            "perf/tokens_per_s", "perf/tflops_per_device", "val/loss", "moe/max_vio/layer2", "moe/bias_spread/layer3"}
    assert need <= tags, need - tags
    assert [e.step for e in ea.Scalars("val/loss")] == [0, 2, 4]
    assert len(t.eval_history) == 3 and t.eval_history[-1]["loss"] < t.eval_history[0]["loss"]

    sample = t.generate("The ", 8)
    assert sample.startswith("The") and isinstance(sample, str)
    summary = t.expert_load_summary()
    assert "MaxVio" in summary and "MTP" in summary and len(summary.splitlines()) == 2 + 3   # 2 MoE layers + MTP


def test_device_memory_report(monkeypatch):
    """The log line's and TensorBoard's memory report: GiB from torch.cuda's counters on a CUDA device, nothing on
    CPU (the log line then has no 'peak')."""
    import types

    import torch

    from megatron_dsv3.training.loop import device_memory
    assert device_memory(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, gib in (("memory_allocated", 1), ("max_memory_allocated", 3), ("memory_reserved", 4),
                      ("max_memory_reserved", 5)):
        monkeypatch.setattr(torch.cuda, name, lambda device, gib=gib: gib * 2 ** 30)
    assert device_memory(types.SimpleNamespace(type="cuda")) == {"allocated": 1.0, "max_allocated": 3.0,
                                                                 "reserved": 4.0, "max_reserved": 5.0}
