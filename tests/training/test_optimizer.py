"""training/optimizer.py: Adam with BF16 moments (paper section 3.3.3).

* BF16MomentAdamW against a float64 closed form of AdamW whose moments are rounded to BF16 after each step (and the
  same closed form without the rounding is far from it: the check can fail);
* which megatron-core path --adam-moments-dtype takes (precision-aware optimizer with TE, ours without, an error
  naming the flags where neither applies);
* the trainer: BF16 moments in the distributed and the plain optimizer, loss close to FP32 moments, resume bit for bit
  (moments saved and loaded, still BF16).
"""
import pytest
import torch

from megatron_dsv3.training.optimizer import BF16MomentAdamW, moments_dtype_of, moments_plan
from tests.training.conftest import trainer_argv

LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.95, 1e-8     # the paper's betas; lr large so that the steps show


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def _reference(w0, grads, round_moments=True):
    """Float64 AdamW (torch's form: decoupled decay, bias correction, eps outside the root); the stored moments
    rounded to BF16 after each step, the step itself taken with the unrounded ones (as TE's FusedAdam)."""
    w = [x.double().clone() for x in w0]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            g = g.double()
            mt = B1 * m[i] + (1 - B1) * g
            vt = B2 * v[i] + (1 - B2) * g * g
            w[i] = w[i] * (1 - LR * WD)
            w[i] = w[i] - LR * (mt / (1 - B1 ** t)) / ((vt / (1 - B2 ** t)).sqrt() + EPS)
            m[i], v[i] = (_bf16(mt), _bf16(vt)) if round_moments else (mt, vt)
    return w, m, v


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """One BF16 ulp at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.abs().clamp(min=1e-30)))
    return torch.pow(2.0, e - 7)


def test_steps_match_float64_closed_form_with_bf16_moments():
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (4, 4)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    # gradients of varied scale (x 1e-3 .. 1e1), so the moments' exponents differ across elements
    grads = [[torch.randn(s, generator=g) * 10 ** torch.randint(-3, 2, s, generator=g).float() for s in shapes]
             for _ in range(6)]
    params = [torch.nn.Parameter(x.clone()) for x in w0]
    opt = BF16MomentAdamW(params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for gs in grads:
        for p, x in zip(params, gs):
            p.grad = x.clone()
        opt.step()
    w, m, v = _reference(w0, grads)
    w_fp32_moments, _, _ = _reference(w0, grads, round_moments=False)
    for p, wr, mr, vr, wf in zip(params, w, m, v, w_fp32_moments):
        st = opt.state[p]
        assert p.dtype == torch.float32 and st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        assert float(st["step"]) == len(grads)
        # the moments: the BF16 rounding of the float64 value, up to one BF16 ulp where the FP32 arithmetic lands on
        # the other side of a rounding boundary (measured: equal everywhere here)
        for got, want in ((st["exp_avg"].double(), mr), (st["exp_avg_sq"].double(), vr)):
            assert torch.all((got - want).abs() <= _ulp_bf16(want)), (got - want).abs().max()
        # the FP32 master weights: two FP32 roundings a step over 6 steps, relative to max(1, |w|): 12 x 2^-24 = 7e-7
        # (measured 2.8e-7)
        err = ((p.double() - wr).abs() / wr.abs().clamp(min=1)).max().item()
        assert err < 1e-6, err
        # without the rounding the weights land elsewhere, by 50x the tolerance (measured 5e-5): the test can fail
        assert ((wf - wr).abs() / wr.abs().clamp(min=1)).max().item() > 2e-5


def test_fp32_moments_class_is_torch_adamw():
    """moments_dtype float32: the same steps as torch.optim.AdamW (FP32 arithmetic, different op order: ~1e-7)."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = BF16MomentAdamW([a], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, moments_dtype=torch.float32)
    ref = torch.optim.AdamW([b], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for _ in range(5):
        x = torch.randn(32, generator=g)
        a.grad, b.grad = x.clone(), x.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert torch.allclose(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_load_state_dict_keeps_bf16_moments():
    """torch's load_state_dict casts state tensors to the parameter's dtype; ours puts the moments back in BF16."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = BF16MomentAdamW([p], lr=LR)
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    other = BF16MomentAdamW([q], lr=LR)
    other.load_state_dict(sd)
    st = other.state[q]
    assert st["exp_avg"].dtype == torch.bfloat16 and torch.equal(st["exp_avg"], opt.state[p]["exp_avg"])
    assert torch.equal(st["exp_avg_sq"], opt.state[p]["exp_avg_sq"]) and float(st["step"]) == 1.0


def test_moments_plan():
    assert moments_plan("fp32", True) == ({}, None)
    fields, cls = moments_plan("bf16", True, backend="te")
    assert cls is None and fields["use_precision_aware_optimizer"] is True
    assert fields["exp_avg_dtype"] == fields["exp_avg_sq_dtype"] == torch.bfloat16
    assert fields["main_params_dtype"] == fields["main_grads_dtype"] == torch.float32
    with pytest.raises(ValueError, match="--adam-moments-dtype bf16 with --no-distributed-optimizer"):
        moments_plan("bf16", False, backend="te")
    with pytest.raises(ValueError, match="apex"):
        moments_plan("bf16", True, backend="apex")
    fields, cls = moments_plan("bf16", False, backend="torch")
    assert fields == {} and issubclass(cls, torch.optim.AdamW) and cls([torch.nn.Parameter(torch.ones(1))]).moments_dtype \
        == torch.bfloat16


def test_torch_adamw_class_is_restored():
    from megatron_dsv3.compat import torch_adamw_class
    import megatron.core.optimizer as mo
    if not mo.USING_PYTORCH_OPTIMIZER:
        pytest.skip("megatron-core builds TE's / apex's FusedAdam here")
    before = torch.optim.AdamW
    _, cls = moments_plan("bf16", True, backend="torch")
    with torch_adamw_class(cls):
        assert torch.optim.AdamW is cls
    assert torch.optim.AdamW is before


# ---- the trainer ---------------------------------------------------------------------------------------------------
def _train(argv):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    t = Trainer(parse_args(argv))
    t.train()
    return t


def _no_te():
    import megatron.core.optimizer as mo
    if not mo.USING_PYTORCH_OPTIMIZER:
        pytest.skip("TE / apex here: the moments are TE's precision-aware optimizer (needs a GPU)")


@pytest.mark.parametrize("flags", [[], ["--no-distributed-optimizer"]], ids=["distributed", "plain"])
def test_trainer_bf16_moments_loss_close_to_fp32(flags, mcore_single, tiny_data):
    """6 steps of the tiny preset: BF16 moments give the FP32-moment losses within 1% (measured: ~1e-3 at step 6;
    the first step is the same: the moments only enter through the update)."""
    _no_te()
    prefix, cache = tiny_data
    ref = _train(trainer_argv(prefix, cache, *flags, iters=6))
    bf = _train(trainer_argv(prefix, cache, *flags, "--adam-moments-dtype", "bf16", iters=6))
    assert moments_dtype_of(ref.optimizer) == torch.float32 and moments_dtype_of(bf.optimizer) == torch.bfloat16
    for p in (p for o in getattr(bf.optimizer, "chained_optimizers", [bf.optimizer]) for g in o.optimizer.param_groups
              for p in g["params"]):
        assert p.dtype == torch.float32              # the master weights (here the parameters' FP32 shards)
    a, b = [h["loss"] for h in ref.history], [h["loss"] for h in bf.history]
    assert a[0] == b[0]
    assert all(abs(x - y) < 0.01 * x for x, y in zip(a, b)), (a, b)
    assert a[1:] != b[1:], "BF16 moments changed nothing: not in use"


def test_trainer_bf16_moments_resume_is_bit_identical(mcore_single, tiny_data, tmp_path):
    """Saved at step 3 of 6 and resumed: steps 4-6 equal the uninterrupted run's bit for bit, moments included, and
    the resumed moments are still BF16 (torch's load would have made them FP32)."""
    _no_te()
    prefix, cache = tiny_data
    bf = ["--adam-moments-dtype", "bf16"]
    full = _train(trainer_argv(prefix, cache, *bf, iters=6))
    ck = str(tmp_path / "ckpt")
    _train(trainer_argv(prefix, cache, *bf, "--save", ck, "--save-interval", "3", "--exit-interval", "3", iters=6))
    resumed = _train(trainer_argv(prefix, cache, *bf, "--load", ck, iters=6))
    assert [h["iteration"] for h in resumed.history] == [4, 5, 6]
    want = [(h["loss"], h["grad_norm"]) for h in full.history[3:]]
    assert [(h["loss"], h["grad_norm"]) for h in resumed.history] == want
    assert moments_dtype_of(resumed.optimizer) == torch.bfloat16
    pa, pb = _states(resumed.optimizer), _states(full.optimizer)
    assert len(pa) == len(pb) > 0
    for (x, sa), (y, sb) in zip(pa, pb):
        assert torch.equal(x, y)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k], sb[k]), k


def _states(optimizer):
    """(master weight, its Adam state) of every parameter, dense and expert optimizers in order."""
    return [(p, o.optimizer.state[p]) for o in getattr(optimizer, "chained_optimizers", [optimizer])
            for g in o.optimizer.param_groups for p in g["params"]]


def _full_then_save(rank, full, save):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    t = Trainer(parse_args(full))
    t.train()
    Trainer(parse_args(save)).train()
    return [h["loss"] for h in t.history]


def test_bf16_moments_resume_at_another_layout(tiny_data, tmp_path):
    """Saved by 2 ranks (EP=2, DP=2, distributed optimizer) with BF16 moments at step 2 of 4, resumed by one process:
    steps 3-4 match the uninterrupted 2-rank run (relative 5e-5 as tests/training/test_parallel.py: the reduction
    order differs), the moments still BF16 after resharding."""
    _no_te()
    from megatron_dsv3.testing import run_distributed, single_process
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import Trainer
    prefix, cache = tiny_data
    ck = str(tmp_path / "ckpt")
    flags = ["--adam-moments-dtype", "bf16", "--expert-model-parallel-size", "2"]
    full = trainer_argv(prefix, cache, *flags, iters=4)
    save = trainer_argv(prefix, cache, *flags, "--save", ck, "--save-interval", "2", "--exit-interval", "2", iters=4)
    want = run_distributed(_full_then_save, 2, ep=2, full=full, save=save, timeout=300)[0]
    with single_process():
        t = Trainer(parse_args(trainer_argv(prefix, cache, "--adam-moments-dtype", "bf16", "--load", ck, iters=4)))
        t.train()
        assert moments_dtype_of(t.optimizer) == torch.bfloat16
    assert [h["iteration"] for h in t.history] == [3, 4]
    assert [h["loss"] for h in t.history] == pytest.approx(want[2:], rel=5e-5)
