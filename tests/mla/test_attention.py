"""MLASelfAttention (local spec, TP=1) against Hugging Face DeepseekV3Attention / DeepseekV2Attention.

Same random weights in both; outputs, input gradients and every weight gradient compared as
max|ours - hf| / max|hf|: float32 within 1e-5 (measured ~2e-7 to 5e-7). float64 does not tighten this:
HF's eager attention takes its softmax in float32 and both RMSNorms compute in float32 (measured 1.3e-7).
HF runs its eager attention (explicit softmax), ours torch SDPA: independent paths.
Positions other than 0..s-1 are tested through the model (tests/model/test_hf_parity.py), the path training takes.
"""
import ast
import pathlib

import pytest
import torch

from megatron_dsv3.config import MLAConfig
from tests.mla.common import (CONFIGS, HF_TO_OURS, build_ours, dsv3_config, full_state, hf_attention, hf_forward,
                              load_ours, rel_err)

CASES = [(name, v) for name, (mla, *_) in CONFIGS.items() for v in ((3, 2) if mla.rope_interleave else (3,))]


def _compare(name, version, dtype=torch.float32, mla_override=None, pad=None, mask_kind=None, seed=0):
    mla, heads, hidden, seq = CONFIGS[name]
    hf, rot = hf_attention(mla, heads, hidden, seq, version=version, dtype=dtype, seed=seed)
    ours = build_ours(dsv3_config(mla_override or mla, heads, hidden, dtype=str(dtype).split(".")[-1]))
    load_ours(ours, full_state(hf))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, seq, hidden, generator=g, dtype=dtype)
    x_hf, x_ours = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    ref = hf_forward(hf, rot, x_hf, pad_mask=pad, version=version)

    mask = None
    if pad is not None:  # megatron convention: bool, True = masked out, [b, 1, s, s]
        mask = pad[:, None, None, :].expand(2, 1, seq, seq)
        if mask_kind == "full":  # causal already folded in: must give the same result
            mask = mask | torch.ones(seq, seq, dtype=torch.bool).triu(1)
    out, bias = ours(x_ours, attention_mask=mask)
    assert bias is None and out.shape == (seq, 2, hidden)
    dy = torch.randn(ref.shape, generator=g, dtype=dtype)
    ref.backward(dy)
    out.backward(dy.transpose(0, 1))
    own = dict(ours.named_parameters())
    errs = {"out": rel_err(out.transpose(0, 1), ref), "dx": rel_err(x_ours.grad.transpose(0, 1), x_hf.grad)}
    for k, p in hf.named_parameters():
        errs["d" + HF_TO_OURS[k]] = rel_err(own[HF_TO_OURS[k]].grad, p.grad)
    return errs


@pytest.mark.parametrize("name,version", CASES)
def test_parity_with_hf_float32(mcore_single, name, version):
    errs = _compare(name, version)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("mask_kind", ["padding", "full"])
def test_padding_mask(mcore_single, mask_kind):
    _, _, _, seq = CONFIGS["odd_halfsplit"]
    pad = torch.zeros(2, seq, dtype=torch.bool)
    pad[0, seq - 5:] = True    # right padding in sequence 0
    pad[1, 3:6] = True         # a hole in sequence 1
    errs = _compare("odd_halfsplit", 3, pad=pad, mask_kind=mask_kind)
    assert max(errs.values()) < 1e-5, errs


def test_parity_is_sensitive_to_rope_layout_and_yarn(mcore_single):
    """The comparison would catch the wrong rope layout or a missing YaRN (guards the test itself)."""
    mla = CONFIGS["v3_yarn"][0]
    flipped = MLAConfig(**{**mla.__dict__, "rope_interleave": not mla.rope_interleave})
    assert _compare("v3_yarn", 3, mla_override=flipped)["out"] > 1e-3
    no_yarn = MLAConfig(**{**mla.__dict__, "yarn": None})
    assert _compare("v3_yarn", 3, mla_override=no_yarn)["out"] > 1e-3


def test_parameter_names_and_shapes(mcore_single):
    mla, heads, hidden, _ = CONFIGS["v3_yarn"]
    ours = build_ours(dsv3_config(mla, heads, hidden))
    shapes = {k: tuple(v.shape) for k, v in ours.named_parameters()}
    assert shapes == {
        "linear_q_down_proj.weight": (24, 32), "q_layernorm.weight": (24,),
        "linear_q_up_proj.weight": (4 * 24, 24), "linear_kv_down_proj.weight": (16 + 8, 32),
        "kv_layernorm.weight": (16,), "linear_kv_up_proj.weight": (4 * (16 + 16), 16),
        "linear_proj.weight": (32, 4 * 16)}
    assert not list(ours.buffers())  # rope tables are a cache, not state


def test_te_backend_refused_without_te():
    from megatron_dsv3.compat import HAVE_TE
    from megatron_dsv3.specs import get_mla_spec
    cfg = dsv3_config(*CONFIGS["v3_yarn"][:3])
    if HAVE_TE:
        spec = get_mla_spec(cfg, "te")
        assert spec.submodules.linear_q_down_proj.params == {"parallel_mode": "duplicated"}
    else:
        with pytest.raises(ValueError, match="Transformer Engine"):
            get_mla_spec(cfg, "te")


def test_no_torch_cuda_in_module_source():
    """No torch.cuda.* and no .cuda() anywhere in megatron_dsv3/mla (the device comes from the inputs)."""
    src = pathlib.Path(__file__).resolve().parents[2] / "megatron_dsv3" / "mla"
    files = sorted(src.glob("*.py"))
    assert len(files) >= 4
    for f in files:
        tree = ast.parse(f.read_text())
        hits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "cuda"]
        assert not hits, f"CUDA use in {f.name} at lines {hits}"


def test_inside_megatron_transformer_layer(mcore_single):
    """megatron-core's TransformerLayer builds our spec and calls our forward with its own keyword set;
    the layer's dist-checkpoint state dict covers every attention parameter."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_dsv3.norm import RMSNorm
    from megatron_dsv3.specs import get_mla_spec
    mla, heads, hidden, seq = CONFIGS["v3_yarn"]
    cfg = dsv3_config(mla, heads, hidden)
    spec = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm, self_attention=get_mla_spec(cfg), self_attn_bda=get_bias_dropout_add))
    layer = build_module(spec, config=cfg.to_transformer_config(), layer_number=1)
    x = torch.randn(seq, 2, hidden, requires_grad=True)
    out, _ = layer(x, attention_mask=None)
    out.square().mean().backward()
    assert out.shape == x.shape and x.grad is not None
    names = {k for k, _ in layer.named_parameters()}
    assert {"self_attention." + v for v in HF_TO_OURS.values() if v != "linear_q_proj.weight"} <= names
    assert names <= set(layer.sharded_state_dict())


def _fake_flash_attn_func(calls):
    """flash_attn_func's contract in plain torch ([b, s, n, d] in, (out [b, s, n, d_v], lse) out), recording calls."""
    import torch.nn.functional as F

    def fn(q, k, v, softmax_scale=None, causal=False, deterministic=False):
        calls.append({"shape": tuple(q.shape), "causal": causal, "deterministic": deterministic})
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal,
                                           scale=softmax_scale)
        return o.transpose(1, 2), None
    return fn


def test_flash_attention_4_layout_and_choice(monkeypatch):
    """fa4_attention takes our [s, b, n, d] tensors to flash_attn_func's [b, s, n, d] and back to [s, b, n d_v],
    equal to SDPA's path (causal and full, b = 2, d_qk != d_v); SDPAttention uses it only where "fa4" is the first
    backend in use, on CUDA, without a padding mask or dropout, with square attention, and asks for its
    deterministic backward under torch's deterministic algorithms."""
    import torch

    from megatron_dsv3.mla import core_attention as C
    from megatron_dsv3.config import DSV3Config
    calls = []
    fake = _fake_flash_attn_func(calls)
    g = torch.Generator().manual_seed(0)
    s, b, n, dqk, dv = 7, 2, 3, 12, 8
    q, k = (torch.randn(s, b, n, dqk, generator=g) for _ in range(2))
    v = torch.randn(s, b, n, dv, generator=g)
    tc = DSV3Config.from_preset("tiny").to_transformer_config()
    for causal in (True, False):
        core = C.SDPAttention(tc, 1, k_channels=dqk, v_channels=dv, softmax_scale=0.3,
                              attn_mask_type=C.AttnMaskType.causal if causal else C.AttnMaskType.no_mask)
        want = core(q, k, v)                                       # CPU: SDPA
        got = C.fa4_attention(fake, q, k, v, 0.3, causal, False)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert calls[-1] == {"shape": (b, s, n, dqk), "causal": causal, "deterministic": False}

    monkeypatch.setattr(C, "flash_attn_4", lambda: fake)
    cuda = torch.device("cuda")
    core = C.SDPAttention(tc, 1, k_channels=dqk, v_channels=dv, backends=("fa4", "cudnn", "math"))
    assert core._fa4(cuda, False, 0.0, 8, 8) is fake
    assert core._fa4(torch.device("cpu"), False, 0.0, 8, 8) is None
    assert core._fa4(cuda, True, 0.0, 8, 8) is None and core._fa4(cuda, False, 0.1, 8, 8) is None
    assert core._fa4(cuda, False, 0.0, 4, 8) is None
    assert C.SDPAttention(tc, 1, k_channels=dqk, v_channels=dv)._fa4(cuda, False, 0.0, 8, 8) is None   # default
    try:
        torch.use_deterministic_algorithms(True)
        assert core.backends_in_use(core._deterministic()) == ("fa4", "math") and core._deterministic()
        assert core._fa4(cuda, False, 0.0, 8, 8) is fake
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(C, "flash_attn_4", lambda: None)                  # not installed: SDPA
    assert core._fa4(cuda, False, 0.0, 8, 8) is None
