"""DeepSeekMoE (megatron_dsv3/moe/layer.py, experts.py) against Hugging Face's DeepseekV3MoE / DeepseekV2Moe
(router + routed experts + shared experts), outputs and gradients; the grouped expert paths against the loop
reference; the specs."""
import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.moe.experts import experts_loop_reference, grouped_swiglu, padded_swiglu


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _build_ours(cfg: DSV3Config):
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.specs import get_moe_spec
    return build_module(get_moe_spec(cfg), config=cfg.to_transformer_config())


def load_hf_weights(ours, hf) -> None:
    """HF (in-memory, fused experts) -> ours, TP = EP = 1. The mapping the checkpoint converter implements."""
    f = ours.moe.expert_ffn_hidden_size
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        if ours.router.expert_bias is not None:
            ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        gate_up = hf.experts.gate_up_proj                          # [E, 2f, h]: rows [gate; up]
        ours.experts.weight1.copy_(gate_up.transpose(1, 2))        # [E, h, 2f]: columns [gate | up]
        ours.experts.weight2.copy_(hf.experts.down_proj.transpose(1, 2))   # [E, h, f] -> [E, f, h]
        assert gate_up.shape[1] == 2 * f
        se = hf.shared_experts
        ours.shared_experts.linear_fc1.weight.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight], dim=0))
        ours.shared_experts.linear_fc2.weight.copy_(se.down_proj.weight)


def _hf_moe(cfg: DSV3Config, v2: bool = False):
    moe = cfg.moe
    kw = dict(hidden_size=cfg.hidden_size, moe_intermediate_size=moe.expert_ffn_hidden_size,
              n_routed_experts=moe.num_experts, n_shared_experts=moe.num_shared_experts,
              num_experts_per_tok=moe.top_k, n_group=moe.n_group, topk_group=moe.topk_group,
              routed_scaling_factor=moe.routed_scaling_factor, num_hidden_layers=1)
    if v2:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        return DeepseekV2Moe(DeepseekV2Config(topk_method="group_limited_greedy", **kw))
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    return DeepseekV3MoE(DeepseekV3Config(norm_topk_prob=moe.norm_topk_prob, **kw))


def _randomize_hf(hf, bias: bool = True):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3 if "gate.weight" in name else 0.1)
        if bias:
            hf.gate.e_score_correction_bias.normal_(0, 0.1)        # non-zero: it changes choices


MOE_CASES = [
    dict(num_experts=8, top_k=2, n_group=1, topk_group=1, num_shared_experts=1),
    dict(num_experts=16, top_k=6, n_group=4, topk_group=2, num_shared_experts=2),     # k=6 > 4 experts per group
    dict(num_experts=16, top_k=3, n_group=8, topk_group=3, num_shared_experts=1, norm_topk_prob=False,
         routed_scaling_factor=1.0),
]


@pytest.mark.parametrize("moe_kw", MOE_CASES)
def test_deepseek_moe_matches_hf_v3(mcore_single, moe_kw):
    torch.manual_seed(100)
    h, s, b = 32, 7, 3
    cfg = DSV3Config.from_preset("tiny", hidden_size=h, moe=dict(dict(expert_ffn_hidden_size=16, seq_aux_loss_coeff=0.0,
                                                                      routed_scaling_factor=2.5), **moe_kw))
    ours, hf = _build_ours(cfg), _hf_moe(cfg)
    _randomize_hf(hf)
    load_hf_weights(ours, hf)
    x = torch.randn(s, b, h)
    x_hf = x.transpose(0, 1).contiguous().requires_grad_(True)            # HF is [b, s, h]
    x_ours = x.clone().requires_grad_(True)
    ref = hf(x_hf)
    out, bias = ours(x_ours)
    assert bias is None and out.shape == (s, b, h)
    assert _rel(out.transpose(0, 1), ref) < 1e-5                           # float32: 1e-5 relative
    g = torch.randn(b, s, h)
    ref.backward(g)
    out.backward(g.transpose(0, 1))
    assert _rel(x_ours.grad.transpose(0, 1), x_hf.grad) < 1e-5
    assert _rel(ours.router.weight.grad, hf.gate.weight.grad) < 1e-5
    assert _rel(ours.experts.weight1.grad, hf.experts.gate_up_proj.grad.transpose(1, 2)) < 1e-5
    assert _rel(ours.experts.weight2.grad, hf.experts.down_proj.grad.transpose(1, 2)) < 1e-5
    se = hf.shared_experts
    assert _rel(ours.shared_experts.linear_fc1.weight.grad,
                torch.cat([se.gate_proj.weight.grad, se.up_proj.weight.grad])) < 1e-5
    # the bias mattered: zero it and the choice (so the output) changes
    assert int(ours.router.tokens_per_expert.sum()) == s * b * cfg.moe.top_k
    with torch.no_grad():
        ours.router.expert_bias.zero_()
        assert _rel(ours(x)[0], out) > 1e-3


def test_deepseek_moe_matches_hf_v2_softmax(mcore_single):
    """DeepSeek-V2 routing: softmax scores, groups scored by their max, no normalisation, no bias."""
    torch.manual_seed(101)
    h, s, b = 32, 5, 2
    cfg = DSV3Config.from_preset("tiny", hidden_size=h, moe=dict(
        num_experts=16, top_k=4, n_group=4, topk_group=2, group_score_topk=1, score_function="softmax",
        norm_topk_prob=False, expert_bias=False, routed_scaling_factor=1.5, num_shared_experts=2,
        expert_ffn_hidden_size=16, seq_aux_loss_coeff=0.0))
    ours, hf = _build_ours(cfg), _hf_moe(cfg, v2=True)
    _randomize_hf(hf, bias=False)
    load_hf_weights(ours, hf)
    assert ours.router.expert_bias is None and "router.expert_bias" not in ours.state_dict()
    x = torch.randn(s, b, h)
    assert _rel(ours(x)[0].transpose(0, 1), hf(x.transpose(0, 1).contiguous())) < 1e-5


@pytest.mark.parametrize("scaled", [False, True])
def test_grouped_paths_match_loop_reference(scaled):
    """scaled: each row's output times its gate (row_scale), applied inside to the SwiGLU output; the loop
    reference scales the expert's output (a W2) instead."""
    torch.manual_seed(3)
    E, h, f = 5, 16, 8
    counts = torch.tensor([4, 0, 7, 1, 3])                              # an expert without tokens
    x = torch.randn(int(counts.sum()), h, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, h, 2 * f, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, f, h, dtype=torch.float64, requires_grad=True)
    s = torch.rand(x.shape[0], dtype=torch.float64, requires_grad=True) if scaled else None
    inputs = (x, w1, w2) + ((s,) if scaled else ())
    ref = experts_loop_reference(x, counts.tolist(), w1, w2, s)
    got = padded_swiglu(x, counts, w1, w2, s)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)       # float64: round-off only
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, g)
    grads = torch.autograd.grad(got, inputs, g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    # torch._grouped_mm (the CUDA bf16 fast path) also runs forward in float32 on CPU: same numbers
    if hasattr(torch, "_grouped_mm"):
        x32, w132, w232 = x.detach().float(), w1.detach().float(), w2.detach().float()
        try:
            fast = grouped_swiglu(x32, counts, w132, w232)
        except RuntimeError as e:                                        # not implemented for this build
            pytest.skip(f"torch._grouped_mm on CPU: {e}")
        torch.testing.assert_close(fast, experts_loop_reference(x32, counts.tolist(), w132, w232),
                                   rtol=1e-5, atol=1e-5)


def test_grouped_path_remakes_the_swiglu_output_and_accumulates_in_place():
    """The grouped path (torch._grouped_mm runs in float32 on CPU): with fuse_wgrad the SwiGLU output is not kept
    (N * f elements fewer saved for backward: dW2 makes it again from h1 and the gates) and the weight gradients
    are added into the existing .grad by per-expert GEMMs; outputs bit-equal to the unfused path, gradients equal
    to float32 round-off, over two accumulating steps."""
    torch.manual_seed(5)
    E, h, f = 4, 16, 8
    counts = torch.tensor([6, 0, 9, 3])
    N = int(counts.sum())
    x0, s0 = torch.randn(N, h), torch.rand(N)
    w10, w20 = torch.randn(E, h, 2 * f), torch.randn(E, f, h)
    dys = [torch.randn(N, h) for _ in range(2)]

    def run(fuse):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        w1, w2 = w10.clone().requires_grad_(), w20.clone().requires_grad_()
        outs, kept_per_step = [], []
        for dy in dys:
            kept = {}        # per step: storages alive together (a later step may reuse a freed address)

            def pack(t):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = grouped_swiglu(x, counts, w1, w2, s, fuse_wgrad=fuse)
            y.backward(dy)
            outs.append(y.detach())
            kept_per_step.append(sum(kept.values()))
        return outs, (x.grad, s.grad, w1.grad, w2.grad), kept_per_step

    try:
        ref_out, ref_g, ref_bytes = run(False)
    except RuntimeError as e:                                            # not implemented for this build
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    out, g, nbytes = run(True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
    for a, r in zip(g, ref_g):      # dx, ds as torch's own derivative of _grouped_mm computes them (its formula
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)         # may order the sums otherwise), dW1, dW2
    assert [r - b for r, b in zip(ref_bytes, nbytes)] == [N * f * 4] * len(dys)   # the SwiGLU output, float32


@pytest.mark.gpu
def test_grouped_mm_bf16_matches_loop_on_cuda():
    torch.manual_seed(4)
    E, h, f = 4, 64, 32
    counts = torch.tensor([5, 0, 17, 9], device="cuda")
    x = torch.randn(int(counts.sum()), h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, h, 2 * f, device="cuda") * 0.1).bfloat16().requires_grad_(True)
    w2 = (torch.randn(E, f, h, device="cuda") * 0.1).bfloat16().requires_grad_(True)
    fast = grouped_swiglu(x, counts, w1, w2)
    ref = experts_loop_reference(x, counts.tolist(), w1, w2)
    assert _rel(fast, ref) < 2e-2                                        # bf16: ~1e-2
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(fast, (x, w1, w2), g), torch.autograd.grad(ref, (x, w1, w2), g)):
        assert _rel(a, r) < 2e-2


def test_specs(mcore_single):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.moe import DeepSeekMoE
    from megatron_dsv3.specs import get_dense_mlp_spec, get_moe_spec

    cfg = DSV3Config.from_preset("tiny")
    tc = cfg.to_transformer_config()
    dense = build_module(get_dense_mlp_spec(cfg), config=tc)
    assert isinstance(dense, MLP)
    assert dense.linear_fc1.weight.shape == (2 * cfg.moe.dense_ffn_hidden_size, cfg.hidden_size)
    assert dense.linear_fc2.weight.shape == (cfg.hidden_size, cfg.moe.dense_ffn_hidden_size)
    spec = get_moe_spec(cfg)
    assert spec.module is DeepSeekMoE and spec.params == {"moe": cfg.moe}
    m = build_module(spec, config=tc)
    E, h, f = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_ffn_hidden_size
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert shapes == {"router.weight": (E, h), "router.expert_bias": (E,), "experts.weight1": (E, h, 2 * f),
                      "experts.weight2": (E, f, h), "shared_experts.linear_fc1.weight": (2 * f, h),
                      "shared_experts.linear_fc2.weight": (h, f)}
    assert m.router.weight.dtype == torch.float32
    # the paper's init (section 4.2, the default: scaled_output_init=False): weight1 and weight2 ~ N(0, init_method_std)
    for w in (m.experts.weight1, m.experts.weight2):
        assert abs(float(w.detach().std()) - cfg.init_method_std) < 0.1 * cfg.init_method_std
    no_shared = build_module(get_moe_spec(cfg.replace(moe={"num_shared_experts": 0})), config=tc)
    assert no_shared.shared_experts is None
    from megatron_dsv3.compat import HAVE_TE
    if not HAVE_TE:
        with pytest.raises(ValueError, match="Transformer Engine"):
            get_moe_spec(cfg, backend="te")


@pytest.mark.gpu
def test_deepseek_moe_cuda_bf16_takes_grouped_mm_path(mcore_single):
    """The whole layer on CUDA in bf16 (torch._grouped_mm experts, float32 routing math) against itself in float32 on the
    same bf16-rounded input and router weight: same routing (gating math is float32 in both), bf16 expert math within ~2e-2."""
    from megatron_dsv3.moe import experts as experts_mod
    torch.manual_seed(5)
    h, s, b = 64, 16, 4
    cfg = DSV3Config.from_preset("tiny", hidden_size=h, moe=dict(num_experts=16, top_k=4, n_group=4, topk_group=2,
                                                                 expert_ffn_hidden_size=32))
    ours = _build_ours(cfg).cuda()
    with torch.no_grad():  # the router weight becomes bf16 below: give the float32 run the same values
        ours.router.weight.copy_(ours.router.weight.bfloat16().float())
    x = torch.randn(s, b, h, device="cuda").bfloat16()
    out32, _ = ours(x.float())
    idx32, _ = ours.router(x.float())
    ours.bfloat16()
    assert ours.router.expert_bias.dtype == torch.float32 and ours.experts.weight1.dtype == torch.bfloat16
    assert experts_mod.can_use_grouped_mm(x.reshape(-1, h), ours.experts.weight1, ours.experts.weight2)
    xb = x.clone().requires_grad_(True)
    out16, _ = ours(xb)
    assert torch.equal(ours.router(x)[0], idx32)
    assert out16.dtype == torch.bfloat16 and _rel(out16, out32) < 2e-2
    out16.float().square().sum().backward()
    assert ours.experts.weight1.grad is not None and torch.isfinite(ours.experts.weight1.grad.float()).all()


def test_ranks_per_node_is_explicit_or_from_the_launcher():
    """Node-limited routing by placement never guesses the node size (the world size put every rank on one node,
    silently switching the node limit off): the argument, else torchrun's LOCAL_WORLD_SIZE, else a ValueError."""
    from megatron_dsv3.moe.layer import resolve_ranks_per_node
    assert resolve_ranks_per_node(4, environ={"LOCAL_WORLD_SIZE": "8"}) == 4
    assert resolve_ranks_per_node(None, environ={"LOCAL_WORLD_SIZE": "8"}) == 8
    with pytest.raises(ValueError, match="ranks_per_node.*LOCAL_WORLD_SIZE"):
        resolve_ranks_per_node(None, environ={})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be an integer"):
        resolve_ranks_per_node(None, environ={"LOCAL_WORLD_SIZE": "eight"})
    with pytest.raises(ValueError, match=">= 1"):
        resolve_ranks_per_node(0, environ={})
