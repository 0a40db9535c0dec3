"""One short run of the trainer's whole loop: TensorBoard scalars (loss, MTP per depth, balance loss, lr, grad
norm, tokens/s, TFLOP/s, per-layer MaxVio and bias spread, validation), console lines, the greedy sample and
the expert-load summary."""
import pytest

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


def test_deterministic_mode(mcore_single, tiny_data, monkeypatch, capsys):
    """--deterministic-mode: torch's deterministic algorithms on, the environment for cuBLAS / NCCL / TE set where
    the launcher did not set it (an accepted value kept, one that is not reproducible refused by name before
    anything is built), the attention's CUDA backends without cuDNN's, and two trainings from the same seed giving
    the same losses with everything deterministic turned on."""
    import torch

    from megatron_dsv3.mla.core_attention import SDPAttention
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import DETERMINISTIC_ENV, Trainer
    for k in DETERMINISTIC_ENV:          # absent now, and absent again after the test
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    monkeypatch.setenv("NCCL_ALGO", "^NVLS")             # the launcher's accepted choice is kept
    prefix, cache = tiny_data
    losses, outs = [], []
    try:
        for _ in range(2):
            t = Trainer(parse_args(trainer_argv(prefix, cache, "--deterministic-mode", "--log-interval", "1",
                                                iters=3)))
            assert torch.are_deterministic_algorithms_enabled()
            t.train()
            out = capsys.readouterr().out
            outs.append(out)
            losses.append([line.split("| loss ")[1].split(" ")[0] for line in out.splitlines() if "| loss " in line])
    finally:
        torch.use_deterministic_algorithms(False)
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["NCCL_ALGO"] == "^NVLS"
    assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    assert "deterministic mode: torch deterministic algorithms" in outs[0]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    monkeypatch.setenv("NCCL_ALGO", "Ring,Tree")
    with pytest.raises(ValueError, match=r"NCCL_ALGO=Ring,Tree is not bit-reproducible"):
        parse_args(trainer_argv(prefix, cache, "--deterministic-mode"))
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ValueError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 .* :4096:8 / :16:8"):
        parse_args(trainer_argv(prefix, cache, "--deterministic-mode"))
    parse_args(trainer_argv(prefix, cache))                     # without the flag nothing is checked
    core = SDPAttention.__new__(SDPAttention)
    core.backends = ("cudnn", "flash", "efficient", "math")
    assert core.backends_in_use(False) == core.backends
    assert core.backends_in_use(True) == ("fa4", "flash", "efficient", "math")     # FA4's deterministic backward
    core.backends = ("cudnn",)
    assert core.backends_in_use(True) == ("fa4",)
    core.backends = ("fa4", "cudnn", "math")
    assert core.backends_in_use(True) == ("fa4", "math")
    core.backends = ()
    assert core.backends_in_use(True) == ("math",)
