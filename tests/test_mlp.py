"""mlp.SwiGLUMLP against megatron-core's own MLP (same parameters): outputs and gradients, what it keeps for
backward, and the fallback to megatron-core's forward for what it does not do itself."""
import pytest
import torch


def _pair(cfg_dtype="float64", **tc_over):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.specs import get_dense_mlp_spec
    cfg = DSV3Config.from_preset("tiny").replace(params_dtype=cfg_dtype)
    tc = cfg.to_transformer_config()
    for k, v in tc_over.items():
        setattr(tc, k, v)
    spec = get_dense_mlp_spec(cfg, "local")
    ours = build_module(spec, config=tc)
    theirs = build_module(ModuleSpec(module=MLP, params=spec.params, submodules=spec.submodules), config=tc)
    theirs.load_state_dict(ours.state_dict())
    return cfg, ours, theirs


def _kept(fn):
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def test_swiglu_mlp_equals_megatron_mlp_and_keeps_less(mcore_single):
    from megatron_dsv3.mlp import SwiGLUMLP
    cfg, ours, theirs = _pair()
    assert type(ours) is SwiGLUMLP
    s, b, h, f = 6, 2, cfg.hidden_size, cfg.moe.dense_ffn_hidden_size
    x = torch.randn(s, b, h, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(s, b, h, dtype=torch.float64)
    (y1, bias1), kept1 = _kept(lambda: ours(x))
    (dx1,) = torch.autograd.grad(y1, x, dy)
    x2 = x.detach().clone().requires_grad_()
    (y2, bias2), kept2 = _kept(lambda: theirs(x2))
    (dx2,) = torch.autograd.grad(y2, x2, dy)
    assert bias1 is None and bias2 is None
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx2, rtol=1e-12, atol=1e-12)
    wg1 = torch.autograd.grad(ours(x)[0], list(ours.parameters()), dy)
    wg2 = torch.autograd.grad(theirs(x2)[0], list(theirs.parameters()), dy)
    for a, r in zip(wg1, wg2):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert kept2 - kept1 == 2 * s * b * f * 8          # megatron's SiLU(gate) and up + glu_linear_offset, float64


def test_falls_back_to_megatron_for_per_token_scales(mcore_single):
    cfg, ours, theirs = _pair()
    x = torch.randn(4, 1, cfg.hidden_size, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64)
    torch.testing.assert_close(ours(x, per_token_scale=scale)[0], theirs(x, per_token_scale=scale)[0],
                               rtol=1e-12, atol=1e-12)


def test_builds_as_a_transformer_layer_of_newer_megatron_core_builds_its_mlp(mcore_single):
    """megatron-core >= 0.17's TransformerLayer calls a spec'd mlp class other than MLP itself with
    (config=, pg_collection=, is_mtp_layer=, name=) and no tp_group (0.19.2 failed to build our stack on the H200:
    "MLP.__init__() got an unexpected keyword argument 'pg_collection'"). Built that way here on any version."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3.compat import get_process_group_collection
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.mlp import SwiGLUMLP
    from megatron_dsv3.specs import get_dense_mlp_spec
    cfg = DSV3Config.from_preset("tiny").replace(params_dtype="float64")
    tc = cfg.to_transformer_config()
    spec = get_dense_mlp_spec(cfg, "local")
    pgs = get_process_group_collection(None)
    m = build_module(spec, config=tc, pg_collection=pgs, is_mtp_layer=False, name="decoder.layers.0.mlp")
    assert type(m) is SwiGLUMLP and m.tp_group is pgs.tp
    y, _ = m(torch.randn(3, 1, cfg.hidden_size, dtype=torch.float64))
    assert y.shape == (3, 1, cfg.hidden_size)
