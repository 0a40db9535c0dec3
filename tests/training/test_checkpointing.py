"""Resume bit for bit (CPU, float32) and a save killed half-way (the previous checkpoint still loads)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.training.conftest import trainer_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(argv):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    t = Trainer(parse_args(argv))
    t.train()
    return t


def _bias(t):
    from megatron_dsv3.moe.router import routers_of
    return {n: r.expert_bias.clone() for n, r in routers_of([c.module for c in t.chunks])}


def test_resume_is_bit_identical(mcore_single, tiny_data, tmp_path):
    prefix, cache = tiny_data
    full = _train(trainer_argv(prefix, cache, iters=6))
    ref = [(h["loss"], h["grad_norm"], h["lr"]) for h in full.history]
    ref_bias = _bias(full)

    ck = str(tmp_path / "ckpt")
    first = _train(trainer_argv(prefix, cache, "--save", ck, "--save-interval", "3", "--exit-interval", "3", iters=6))
    assert [h["loss"] for h in first.history] == [r[0] for r in ref[:3]]
    assert open(os.path.join(ck, "latest")).read().strip() == "3"

    resumed = _train(trainer_argv(prefix, cache, "--load", ck, iters=6))
    assert resumed.history[0]["iteration"] == 4
    got = [(h["loss"], h["grad_norm"], h["lr"]) for h in resumed.history]
    assert got == ref[3:], f"resumed {got} != uninterrupted {ref[3:]}"        # exact float equality
    for name, b in _bias(resumed).items():                                     # the expert bias came back too
        assert torch.equal(b, ref_bias[name]), name
    params = dict(full.chunks[0].module.named_parameters())
    for n, p in resumed.chunks[0].module.named_parameters():
        assert torch.equal(p, params[n]), n


def test_kill_during_save_keeps_previous_checkpoint(mcore_single, tiny_data, tmp_path):
    prefix, cache = tiny_data
    ck = str(tmp_path / "ckpt")
    _train(trainer_argv(prefix, cache, "--save", ck, "--save-interval", "2", "--exit-interval", "2", iters=4))
    assert open(os.path.join(ck, "latest")).read().strip() == "2"

    # resume in a child process whose next save pauses after writing its shards (before the rename): kill it there
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)   # keep a megatron-core given by it
    env = dict(os.environ, MEGATRON_DSV3_SAVE_PAUSE_S="120", TORCHDYNAMO_DISABLE="1", PYTHONPATH=path)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    argv = trainer_argv(prefix, cache, "--save", ck, "--load", ck, "--save-interval", "2", iters=4)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_dsv3.train", *argv], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tmp = os.path.join(ck, ".tmp_iter_0000004")
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if os.path.isfile(os.path.join(tmp, "metadata.json")):
                break
            if proc.poll() is not None:
                pytest.fail(f"child exited early:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("the child never reached the save")
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.isdir(tmp) and not os.path.isdir(os.path.join(ck, "iter_0000004"))
    assert open(os.path.join(ck, "latest")).read().strip() == "2"

    # the previous checkpoint loads and training continues; the next save cleans up the partial one
    t = _train(trainer_argv(prefix, cache, "--save", ck, "--load", ck, iters=4))
    assert t.history[0]["iteration"] == 3 and t.iteration == 4
    assert open(os.path.join(ck, "latest")).read().strip() == "4"
    assert not os.path.exists(tmp)


def test_bf16_save_and_resume(mcore_single, tiny_data, tmp_path):
    prefix, cache = tiny_data
    ck = str(tmp_path / "ckpt")
    full = _train(trainer_argv(prefix, cache, "--bf16", iters=4))
    _train(trainer_argv(prefix, cache, "--bf16", "--save", ck, "--save-interval", "2", "--exit-interval", "2", iters=4))
    resumed = _train(trainer_argv(prefix, cache, "--bf16", "--load", ck, iters=4))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]


def test_load_hf_starts_from_hugging_face_weights(mcore_single, tiny_data, tmp_path):
    """--load-hf: a model exported to HF safetensors (the conversion code) comes back into a fresh trainer."""
    import json
    from megatron_dsv3.checkpoint import ShardedSafetensorsWriter
    from megatron_dsv3.checkpoint.convert import hf_config_dict, iter_hf_tensors, write_hf_tensors
    prefix, cache = tiny_data
    src = _train(trainer_argv(prefix, cache, iters=2))
    hf = tmp_path / "hf"
    hf.mkdir()
    model = src.chunks[0].module
    writer = ShardedSafetensorsWriter(str(hf))
    write_hf_tensors(writer, iter_hf_tensors(model), src.cfg, dtype="fp32")
    writer.finish()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(src.cfg, "fp32")))
    dst = _train(trainer_argv(prefix, cache, "--load-hf", str(hf), "--seed", "7", iters=0))
    want = dict(model.named_parameters())
    for n, p in dst.chunks[0].module.named_parameters():
        assert torch.equal(p, want[n]), n
    for name, b in _bias(dst).items():
        assert torch.equal(b, _bias(src)[name]), name
