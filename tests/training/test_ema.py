"""EMA of the parameters on the host (training/ema.py, paper section 3.2.3): the closed form, resume bit for bit,
evaluation with the EMA restores the training weights exactly, export of the EMA to Hugging Face, the flags.

CPU, float32 parameters. Tolerances: the closed form is computed in float64 from snapshots of the parameters;
the EMA accumulates in float32 over a few steps, so rtol 1e-5 / atol 1e-6 (float32); everything else is exact."""
import importlib.util
import os

import pytest
import torch

from tests.training.conftest import trainer_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trainer(argv):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    return Trainer(parse_args(argv))


def _params(t, dtype=None):
    return {n: p.detach().clone().to(dtype or p.dtype) for n, p in t.chunks[0].module.named_parameters()}


def _ema(t):
    t.ema.wait()
    return {n: e.clone() for n, e in t.ema.tensors(0).items()}


def test_ema_is_the_closed_form_and_eval_ema_restores_the_weights(mcore_single, tiny_data):
    prefix, cache = tiny_data
    d, steps = 0.8, 3
    t = _trainer(trainer_argv(prefix, cache, "--ema-decay", str(d), "--eval-ema", "--eval-iters", "1", iters=steps))
    snaps = [_params(t, torch.float64)]                    # theta_0: the EMA starts at the initial weights
    for _ in range(steps):
        rec = t.train_step()
        assert not rec["skipped"]
        snaps.append(_params(t, torch.float64))
    got = _ema(t)
    assert t.ema.updates == steps
    for n, e in got.items():
        # ema_T = d^T theta_0 + sum_{k=1..T} (1 - d) d^(T-k) theta_k
        want = d ** steps * snaps[0][n] + sum((1 - d) * d ** (steps - k) * snaps[k][n] for k in range(1, steps + 1))
        assert e.dtype == torch.float32
        torch.testing.assert_close(e.double(), want, rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(got[n].double(), snaps[-1][n]) for n in got)   # not simply the live weights

    live = _params(t)
    ema_val = t.evaluate()                               # --eval-ema: the EMA swapped in, then back
    for n, p in t.chunks[0].module.named_parameters():
        assert torch.equal(p, live[n]), n                # the training weights came back exactly
    t.args.eval_ema = False
    live_val = t.evaluate()
    with torch.no_grad():                                # the same evaluation with the EMA copied in by hand
        for n, p in t.chunks[0].module.named_parameters():
            p.copy_(got[n])
    assert t.evaluate() == ema_val != live_val


def test_resume_is_bit_identical_with_ema(mcore_single, tiny_data, tmp_path):
    prefix, cache = tiny_data
    ema = ("--ema-decay", "0.9")
    full = _trainer(trainer_argv(prefix, cache, *ema, iters=5))
    full.train()
    ref = _ema(full)

    ck = str(tmp_path / "ckpt")
    first = _trainer(trainer_argv(prefix, cache, *ema, "--save", ck, "--save-interval", "2", "--exit-interval", "2",
                                  iters=5))
    first.train()
    resumed = _trainer(trainer_argv(prefix, cache, *ema, "--load", ck, iters=5))
    assert resumed.iteration == 2
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    for n, e in _ema(resumed).items():
        assert torch.equal(e, ref[n]), n                 # exact


def test_export_ema_to_hf_and_a_checkpoint_without_ema(mcore_single, tiny_data, tmp_path, capsys):
    from safetensors import safe_open
    from megatron_dsv3.checkpoint.convert import iter_hf_tensors, mcore_to_hf
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools",
                                                                                  "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    convert_main = tool.main

    prefix, cache = tiny_data
    plain, with_ema = str(tmp_path / "plain"), str(tmp_path / "ema")
    _trainer(trainer_argv(prefix, cache, "--save", plain, iters=2)).train()
    capsys.readouterr()
    assert convert_main(["mcore-to-hf", plain, str(tmp_path / "no"), "--ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no EMA" in err[0], err
    assert not os.path.exists(tmp_path / "no")

    # a checkpoint without EMA loaded with --ema-decay: the EMA starts from the loaded weights, said on the console
    t = _trainer(trainer_argv(prefix, cache, "--load", plain, "--save", with_ema, "--ema-decay", "0.5", iters=4))
    assert "the checkpoint holds none; starting it from the loaded weights" in capsys.readouterr().out
    loaded = _params(t)
    for n, e in _ema(t).items():
        assert torch.equal(e, loaded[n].float()), n
    t.train()
    ema = _ema(t)

    out = str(tmp_path / "hf")
    info = mcore_to_hf(with_ema, out, dtype="fp32", ema=True)
    assert info["ema"]
    got = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), "pt") as s:
                got.update({k: s.get_tensor(k) for k in s.keys()})
    with t.ema.swapped_in():                             # the HF tensors of the model holding the EMA
        want = {n: x.clone() for n, x in iter_hf_tensors(t.chunks[0].module, t.cfg)}
    assert set(got) == set(want)
    for n, x in want.items():
        assert torch.equal(got[n], x.float()), n
    live = {n: x.clone() for n, x in iter_hf_tensors(t.chunks[0].module, t.cfg)}
    assert any(not torch.equal(got[n], live[n].float()) for n in got if n.endswith("weight") and "bias" not in n)
    assert len(ema) > 0


@pytest.mark.parametrize("flags, msg", [
    (("--ema-decay", "1.0"), "--ema-decay must be in (0, 1)"),
    (("--ema-decay", "0"), "--ema-decay must be in (0, 1)"),
    (("--ema-decay", "-0.5"), "--ema-decay must be in (0, 1)"),
    (("--eval-ema",), "--eval-ema"),
    (("--ema-decay", "0.99", "--overlap-param-gather"), "--overlap-param-gather"),
])
def test_flag_validation_is_one_line(tiny_data, flags, msg):
    from megatron_dsv3.training.arguments import parse_args
    prefix, cache = tiny_data
    with pytest.raises(ValueError) as e:
        parse_args(trainer_argv(prefix, cache, *flags))
    assert msg in str(e.value) and "\n" not in str(e.value)
