"""The per-step FP8 weight cache (fp8/weight_cache.py): the same bits as quantising on every use, one quantisation of
each weight per optimizer step whatever the number of micro-batches, and never a stale copy after a step -- whether
the step updates the weights through autograd's version counter (torch's optimizers) or behind it (megatron's
`.data` copies, covered by training/hooks.py's drop)."""
import pytest
import torch

from megatron_dsv3.fp8 import experts as fp8_experts, linear as fp8_lin, quant
from megatron_dsv3.fp8.experts import fp8_expert_mlp
from megatron_dsv3.fp8.linear import fp8_linear
from megatron_dsv3.fp8.weight_cache import ATTR, cached, configure, drop_caches


@pytest.fixture
def block_calls(monkeypatch):
    """Counts the weight quantiser's calls (quant.quantize_blocks, what quantizer() resolves to on CPU)."""
    n = {"calls": 0}
    orig = quant.quantize_blocks

    def counting(*a, **k):
        n["calls"] += 1
        return orig(*a, **k)
    monkeypatch.setattr(quant, "quantize_blocks", counting)
    return n


def _linear_step(x, w, dy, cache):
    x = x.detach().requires_grad_()
    y = fp8_linear(x, w, weight_cache=cache)
    y.backward(dy)
    return y.detach(), x.grad


def test_cached_keys_on_version_and_storage():
    p = torch.nn.Parameter(torch.randn(4, 4))
    calls = []
    make = lambda t: (calls.append(1), t.detach().clone())[1]
    a = cached(p, "k", make)
    assert cached(p, "k", make) is a and len(calls) == 1
    with torch.no_grad():
        p.mul_(2)                                            # version counter
    b = cached(p, "k", make)
    assert len(calls) == 2 and torch.equal(b, p.detach())
    p.data = torch.randn(4, 4)                               # new storage (version of the new tensor: 0)
    c = cached(p, "k", make)
    assert len(calls) == 3 and torch.equal(c, p.detach())
    cached(p, "other", make)                                 # kinds are separate
    assert len(calls) == 4
    q = torch.nn.Parameter(torch.randn(2))
    cached(q, "k", make, enabled=False)
    assert not getattr(q, ATTR, None)                        # off: nothing kept


def test_linear_same_bits_with_and_without_cache_one_quantisation_per_step(block_calls):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(192, 320, generator=g).bfloat16())
    mbs = [(torch.randn(200, 320, generator=g).bfloat16(), torch.randn(200, 192, generator=g).bfloat16())
           for _ in range(3)]
    ref = []
    for x, dy in mbs:
        ref.append(_linear_step(x, w, dy, cache=False))
    dw_ref = w.grad.clone()
    assert block_calls["calls"] == 6                        # uncached: Fprop and Dgrad quantise W every micro-batch
    w.grad = None
    block_calls["calls"] = 0
    for (x, dy), (y0, dx0) in zip(mbs, ref):
        y, dx = _linear_step(x, w, dy, cache=True)
        assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert torch.equal(w.grad, dw_ref)
    assert block_calls["calls"] == 1                        # cached: once for the step (the transpose reuses it)
    assert set(getattr(w, ATTR)) == {"blocks_and_t"}
    # "fprop": Fprop's blocks kept, Dgrad's their byte transpose in each backward: the same bits, one quantisation
    drop_caches([torch.nn.ParameterList([w])])
    w.grad = None
    block_calls["calls"] = 0
    for (x, dy), (y0, dx0) in zip(mbs, ref):
        y, dx = _linear_step(x, w, dy, cache="fprop")
        assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert torch.equal(w.grad, dw_ref) and block_calls["calls"] == 1
    store = getattr(w, ATTR)
    assert set(store) == {"blocks"} and [t.shape for t in store["blocks"][1]] == [(192, 320), (2, 3)]


def test_optimizer_step_invalidates_the_linear_cache():
    """After a torch optimizer step the cached result equals a fresh quantisation of the new weight, and differs
    from the pre-step output (so a stale copy would fail the test)."""
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(256, 256, generator=g))
    x, dy = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    opt = torch.optim.SGD([w], lr=0.5)
    y_before, _ = _linear_step(x, w, dy, cache=True)
    opt.step()
    y_after, dx_after = _linear_step(x, w, dy, cache=True)
    w.grad = None
    y_fresh, dx_fresh = _linear_step(x, w, dy, cache=False)
    assert not torch.equal(y_after, y_before)
    assert torch.equal(y_after, y_fresh) and torch.equal(dx_after, dx_fresh)


def test_writes_behind_autograd_need_the_drop_and_the_trainer_hook_drops():
    """megatron's optimizers copy the new weights with .data (no version bump): the cache cannot see that, and
    drop_caches (called by training/hooks.after_optimizer_step) is what keeps it right."""
    from megatron_dsv3 import DSV3Config
    from megatron_dsv3.training.hooks import after_optimizer_step

    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 256, bias=False)
    w = lin.weight
    x = torch.randn(32, 256, generator=g)
    y_old = fp8_linear(x, w, weight_cache=True).detach()
    w.data.copy_(torch.randn(256, 256, generator=g))        # as megatron's _copy_main_params_to_model_params
    y_fresh = fp8_linear(x, w, weight_cache=False).detach()
    assert not torch.equal(y_old, y_fresh)
    assert torch.equal(fp8_linear(x, w, weight_cache=True), y_old)          # stale without the drop
    cfg = DSV3Config.from_preset("tiny", fp8={"enabled": True, "backend": "native"})
    after_optimizer_step(lin, cfg, 0.0, 1.0)
    assert torch.equal(fp8_linear(x, w, weight_cache=True), y_fresh)


def test_experts_same_bits_with_and_without_cache_and_invalidated_by_a_step(block_calls):
    g = torch.Generator().manual_seed(3)
    E, h, f = 3, 256, 128
    counts = torch.tensor([100, 0, 156])                    # ragged, one expert without tokens
    w1 = torch.nn.Parameter(torch.randn(E, h, 2 * f, generator=g).bfloat16())
    w2 = torch.nn.Parameter(torch.randn(E, f, h, generator=g).bfloat16())
    mbs = [(torch.randn(256, h, generator=g).bfloat16(), torch.randn(256, h, generator=g).bfloat16())
           for _ in range(2)]

    def run(cache):
        outs = []
        for x, dy in mbs:
            x = x.detach().requires_grad_()
            y = fp8_expert_mlp(x, counts, w1, w2, weight_cache=cache)
            y.backward(dy)
            outs.append((y.detach(), x.grad))
        grads = (w1.grad.clone(), w2.grad.clone())
        w1.grad = w2.grad = None
        return outs, grads

    ref, gref = run(False)
    # uncached: 2 weights x (Fprop + Dgrad) x 2 micro-batches (the CPU reference quantises expert by expert)
    assert block_calls["calls"] == 8 * E
    block_calls["calls"] = 0
    got, ggot = run(True)
    assert block_calls["calls"] == 2 * E                    # once per weight for the step
    for (y, dx), (y0, dx0) in zip(got, ref):
        assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert all(torch.equal(a, b) for a, b in zip(ggot, gref))
    drop_caches([torch.nn.ParameterList([w1, w2])])         # "fprop": only Fprop's (transposed) copy is kept
    block_calls["calls"] = 0
    got, ggot = run("fprop")
    assert block_calls["calls"] == 2 * E and set(getattr(w1, ATTR)) == {"expert_blocks_t"}
    assert getattr(w1, ATTR)["expert_blocks_t"][1][0].shape == (E, 2 * f, h)
    for (y, dx), (y0, dx0) in zip(got, ref):
        assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert all(torch.equal(a, b) for a, b in zip(ggot, gref))
    with torch.no_grad():                                   # an optimizer step
        w1.add_(torch.randn(w1.shape, generator=g).bfloat16())
        w2.mul_(-1.5)
    after, _ = run(True)
    fresh, _ = run(False)
    for (y, dx), (y1, dx1), (y0, _) in zip(after, fresh, ref):
        assert torch.equal(y, y1) and torch.equal(dx, dx1) and not torch.equal(y, y0)


def test_configure_and_config_field(mcore_single):
    from megatron_dsv3 import DSV3Config
    from megatron_dsv3.config import FP8Config
    from megatron_dsv3.fp8.linear import FP8DuplicatedLinear

    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="weight_cache must be True, False or 'fprop'"):
            FP8Config(weight_cache=bad)
    tc = DSV3Config.from_preset("tiny").to_transformer_config()
    m = torch.nn.Sequential(FP8DuplicatedLinear(128, 128, config=tc, init_method=tc.init_method))
    assert m[0].fp8_weight_cache
    m[0](torch.randn(4, 128))
    assert getattr(m[0].weight, ATTR)                        # on by default: a copy is kept
    configure(m, FP8Config(enabled=True, weight_cache=False))
    assert not m[0].fp8_weight_cache and not getattr(m[0].weight, ATTR)
    m[0](torch.randn(4, 128))
    assert not getattr(m[0].weight, ATTR)
    class Experts(torch.nn.Module):
        fp8_grouped_gemm = "host_loop"
    m.append(Experts())
    configure(m, FP8Config(enabled=True, grouped_gemm="triton"))
    assert m[1].fp8_grouped_gemm == "triton" and m[0].fp8_weight_cache
    with pytest.raises(ValueError, match="grouped_gemm"):
        FP8Config(grouped_gemm="cutlass")
    m[0](torch.randn(4, 128))
    assert drop_caches(m) == 1 and not getattr(m[0].weight, ATTR)
    m[0](torch.randn(4, 128))
    configure(m, FP8Config(enabled=True, weight_cache="fprop"))       # the other mode's copies go
    assert m[0].fp8_weight_cache == "fprop" and not getattr(m[0].weight, ATTR)
    m[0](torch.randn(4, 128))
    assert set(getattr(m[0].weight, ATTR)) == {"blocks"}


def test_memory_estimate_counts_the_cache():
    from megatron_dsv3 import DSV3Config
    from megatron_dsv3.training.memory import FP8_WEIGHT_CACHE_BYTES, GiB, estimate_memory, stage_parameters

    on = DSV3Config.from_preset("tiny", fp8={"enabled": True, "backend": "native"})
    off = on.replace(fp8={"weight_cache": False})
    e_on, e_off = estimate_memory(on, 1, 1), estimate_memory(off, 1, 1)
    p = stage_parameters(on, 0)
    assert 0 < p["fp8"] < p["dense"] + p["expert"]
    assert e_off["fp8_weight_cache"] == 0
    assert e_on["weights"] - e_off["weights"] == pytest.approx(p["fp8"] * FP8_WEIGHT_CACHE_BYTES / GiB)
    half = estimate_memory(on.replace(fp8={"weight_cache": "fprop"}), 1, 1)["fp8_weight_cache"]
    assert half == pytest.approx(e_on["fp8_weight_cache"] / 2)
    assert estimate_memory(on, 1, 1, fp8=False)["fp8_weight_cache"] == 0
