"""Router (megatron_dsv3/moe/router.py) against Hugging Face's DeepseekV3TopkRouter, the paper's equations
written out in float64, and a load-balancing simulation. CPU, no process group needed."""
import math

import pytest
import torch

from megatron_dsv3.config import DSV3Config, MoEConfig
from megatron_dsv3.moe.router import (AuxLossScaler, Router, apply_expert_bias_update, batch_balance_loss,
                                      group_limited_topk, max_violation, placement_groups, route,
                                      sequence_balance_loss, set_aux_loss_scale, update_expert_bias)


def _moe(**kw) -> MoEConfig:
    base = dict(num_experts=16, num_shared_experts=1, top_k=4, expert_ffn_hidden_size=16, dense_ffn_hidden_size=64,
                n_group=4, topk_group=2, routed_scaling_factor=2.5)
    base.update(kw)
    return MoEConfig(**base)


def _hf_router(moe: MoEConfig, h: int, weight: torch.Tensor, bias: torch.Tensor):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    c = DeepseekV3Config(hidden_size=h, n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                         n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
                         routed_scaling_factor=moe.routed_scaling_factor, num_hidden_layers=1)
    r = DeepseekV3TopkRouter(c)
    with torch.no_grad():
        r.weight.copy_(weight)
        r.e_score_correction_bias.copy_(bias)
    return r


def _dense_gates(idx, gates, E):
    """[T, k] (index, gate) pairs -> [T, E] dense, so that unordered top-k sets compare."""
    return torch.zeros(idx.shape[0], E, dtype=torch.float64).scatter_(1, idx, gates.double())


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-30))


# n_group=1; groups with k > experts per group (cross-group choices forced); many small groups; no norm
ROUTER_CASES = [
    dict(n_group=1, topk_group=1, top_k=4),
    dict(n_group=4, topk_group=2, top_k=6),                          # 4 experts per group: k=6 spans 2 groups
    dict(n_group=8, topk_group=3, top_k=5, norm_topk_prob=False, routed_scaling_factor=1.0),
]


@pytest.mark.parametrize("kw", ROUTER_CASES)
def test_route_matches_hf_with_random_bias(kw):
    torch.manual_seed(11)
    moe, h, T = _moe(**kw), 24, 64
    weight, bias, x = torch.randn(moe.num_experts, h) * 0.3, torch.randn(moe.num_experts) * 0.2, torch.randn(T, h)
    _, hf_gates, hf_idx = _hf_router(moe, h, weight, bias)(x)
    idx, gates, _ = route(x @ weight.T, moe, bias)
    assert torch.equal(idx.sort(dim=1).values, hf_idx.sort(dim=1).values)
    # float32, same operations: 1e-6 relative
    assert _rel(_dense_gates(idx, gates, moe.num_experts), _dense_gates(hf_idx, hf_gates, moe.num_experts)) < 1e-6
    if moe.n_group > 1:  # every chosen expert lies in one of the token's topk_group groups; k spans > 1 group
        groups = idx // moe.experts_per_group
        used = torch.tensor([len(set(g.tolist())) for g in groups])
        assert used.max() <= moe.topk_group
        if moe.top_k > moe.experts_per_group:
            assert used.min() >= 2


def test_group_mask_is_minus_inf_not_zero():
    """With negative biased scores a 0.0 mask (HF's older port, DeepSeek-V2's group_limited_greedy on softmax
    scores) lets masked experts win; -inf (the published V3 reference, and transformers 5.x) never does."""
    torch.manual_seed(3)
    moe, h, T = _moe(n_group=4, topk_group=1, top_k=2), 8, 32
    weight, x = torch.randn(moe.num_experts, h), torch.randn(T, h)
    bias = torch.full((moe.num_experts,), -2.0)           # every biased score s + b is in (-2, -1)
    scores = torch.sigmoid(x @ weight.T)
    choice = scores + bias
    groups = choice.view(T, 4, 4).topk(2, dim=-1)[0].sum(-1).argmax(-1)            # [T] the one kept group

    # the 0.0-masking variant, as HF's port had it before transformers 5
    keep = torch.zeros(T, 4, dtype=torch.bool).scatter_(1, groups[:, None], True)
    zero_masked = choice.view(T, 4, 4).masked_fill(~keep[..., None], 0.0).view(T, 16)
    zero_idx = zero_masked.topk(2, dim=-1)[1]
    assert (zero_idx // 4 != groups[:, None]).all()       # 0.0 beats every negative score: all picks outside

    idx = group_limited_topk(choice, 2, 4, 1, 2)
    assert (idx // 4 == groups[:, None]).all()             # ours: inside the kept group
    _, _, hf_idx = _hf_router(moe, h, weight, bias)(x)     # transformers 5.24 follows the reference (-inf)
    assert torch.equal(idx.sort(1).values, hf_idx.sort(1).values)


def test_bias_changes_choice_not_gate_weights():
    torch.manual_seed(5)
    moe, h, T = _moe(n_group=1, topk_group=1, top_k=4, norm_topk_prob=False, routed_scaling_factor=1.0), 16, 128
    weight, x = torch.randn(moe.num_experts, h) * 0.5, torch.randn(T, h)
    logits = x @ weight.T
    scores = torch.sigmoid(logits)
    idx0, gates0, _ = route(logits, moe, torch.zeros(moe.num_experts))
    bias = torch.zeros(moe.num_experts)
    bias[:4] = 1.0                                          # experts 0..3 now always win
    idx1, gates1, _ = route(logits, moe, bias)
    assert torch.equal(idx1.sort(1).values, torch.arange(4).expand(T, 4))
    assert not torch.equal(idx0.sort(1).values, idx1.sort(1).values)
    # the gate of a chosen expert is its unbiased affinity, with or without the bias
    torch.testing.assert_close(gates1, scores.gather(1, idx1), rtol=0, atol=0)
    torch.testing.assert_close(gates0, scores.gather(1, idx0), rtol=0, atol=0)
    # normalised gates: the bias changes which experts share the mass, never their unbiased ratios
    moe_n = _moe(n_group=1, topk_group=1, top_k=4, routed_scaling_factor=2.5)
    idx2, gates2, _ = route(logits, moe_n, bias)
    s = scores.gather(1, idx2)
    torch.testing.assert_close(gates2, 2.5 * s / s.sum(1, keepdim=True), rtol=1e-6, atol=0)


def test_update_expert_bias_equation():
    torch.manual_seed(0)
    bias = torch.randn(8)
    load = torch.tensor([10, 3, 7, 7, 0, 25, 4, 0])          # mean 7: two experts exactly at the mean
    new = update_expert_bias(bias, load, 0.01)
    expected = bias.double() + 0.01 * torch.tensor([-1, 1, 0, 0, 1, -1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(new.double(), expected, rtol=0, atol=1e-7)
    assert new.dtype == torch.float32
    assert torch.equal(update_expert_bias(bias, load, 0.0), bias)
    assert max_violation(torch.tensor([10., 10., 10., 30.])) == pytest.approx(1.0)


def _tiny_config(hidden=16, **moe):
    base = {"num_experts": 16, "top_k": 4, "n_group": 4, "topk_group": 2}
    base.update(moe)
    return DSV3Config.from_preset("tiny", hidden_size=hidden, moe=base).to_transformer_config()


def test_bias_update_simulation_drives_maxvio_down():
    """200 global batches of a skewed token stream through the router; only the bias moves (gamma = 1e-3, the
    paper's rate). Measured: MaxVio 2.37 at step 0 -> 0.163 averaged over the last 20 steps (14.5x); the
    floor is sampling noise (256 tokens per expert on average)."""
    torch.manual_seed(1234)
    E, h, T = 16, 16, 1024
    moe = _moe(num_experts=E, top_k=4, n_group=4, topk_group=2, seq_aux_loss_coeff=0.0)
    router = Router(_tiny_config(hidden=h, num_experts=E), moe)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
    skew = torch.randn(h)                             # a shared direction in every token: some experts win
    vio = []
    for step in range(200):
        x = (torch.randn(T, h) + skew).view(T, 1, h)       # [s, b, h]
        with torch.no_grad():
            idx, _ = router(x)
        router.record_tokens(idx)
        m = apply_expert_bias_update([router], rate=1e-3)
        vio.append(m[""]["max_vio"] if "" in m else next(iter(m.values()))["max_vio"])
    start, end = vio[0], sum(vio[-20:]) / 20
    print(f"MaxVio: step 0 {start:.3f}, mean of last 20 steps {end:.3f} ({start / end:.1f}x)")
    assert start > 1.0
    assert end * 5 <= start
    assert router.tokens_per_expert.sum() == 0              # counts reset by the hook


def _seq_loss_reference(scores, idx, s, b, E, K, alpha):
    """Eqs. 17-20, float64 loops: tokens in megatron [s, b] order, sequence j = tokens t*b + j."""
    total = 0.0
    for j in range(b):
        rows = [t * b + j for t in range(s)]
        f = [0.0] * E
        for t in rows:
            for e in idx[t].tolist():
                f[e] += E / (K * s)
        loss = 0.0
        for i in range(E):
            P = sum(float(scores[t, i]) / float(scores[t].sum()) for t in rows) / s
            loss += f[i] * P
        total += alpha * loss
    return total / b


def test_sequence_balance_loss_matches_paper():
    torch.manual_seed(7)
    s, b, E, K, alpha = 12, 3, 8, 2, 1e-4
    scores64 = torch.rand(s * b, E, dtype=torch.float64)
    idx = torch.rand(s * b, E).topk(K, dim=-1)[1]
    ref = _seq_loss_reference(scores64, idx, s, b, E, K, alpha)
    got64 = sequence_balance_loss(scores64, idx, s, b, E, K, alpha)
    assert abs(float(got64) - ref) <= 1e-12 * abs(ref)               # float64: round-off only
    got32 = sequence_balance_loss(scores64.float(), idx, s, b, E, K, alpha)
    assert abs(float(got32) - ref) <= 1e-5 * abs(ref)                # float32: 1e-5 relative
    # the batch-wise variant is the same formula over all s*b tokens as one sequence
    ref_batch = _seq_loss_reference(scores64, idx, s * b, 1, E, K, alpha)
    assert abs(float(batch_balance_loss(scores64, idx, E, K, alpha)) - ref_batch) <= 1e-12 * abs(ref_batch)
    # perfectly balanced routing with uniform affinities gives alpha * 1 per sequence
    even = torch.arange(s * b * K).remainder(E).view(s * b, K)
    flat = torch.full((s * b, E), 0.5, dtype=torch.float64)
    if (s * K) % E == 0:
        assert float(sequence_balance_loss(flat, even, s, b, E, K, alpha)) == pytest.approx(alpha)


@pytest.mark.parametrize("kind", ["sequence", "batch"])
def test_aux_loss_gradient_reaches_router_through_gates(kind):
    """The gates carry the balance loss: backward of sum(gates * 0) yields scale * d(loss)/d(weight)."""
    torch.manual_seed(9)
    s, b, h = 6, 2, 16
    moe = _moe(num_experts=8, top_k=2, n_group=1, topk_group=1, seq_aux_loss_coeff=0.1, aux_loss_type=kind)
    router = Router(_tiny_config(hidden=h, num_experts=8, top_k=2, n_group=1, topk_group=1), moe)
    x = torch.randn(s, b, h)
    try:
        set_aux_loss_scale(0.25)
        idx, gates = router(x)
        (gates * 0).sum().backward()
    finally:
        set_aux_loss_scale(None)
    got = router.weight.grad.clone()
    w = router.weight.detach().clone().requires_grad_(True)
    scores = torch.sigmoid(x.reshape(-1, h) @ w.T)
    if kind == "sequence":
        loss = sequence_balance_loss(scores, idx, s, b, 8, 2, 0.1)
    else:
        loss = batch_balance_loss(scores, idx, 8, 2, 0.1)
    (0.25 * loss).backward()
    assert float(router._aux_sum) == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-10)
    assert router._aux_calls == 1 and float(router._aux_sum) > 0
    router.eval()                                            # no loss, no recording outside training
    router(x)
    assert router._aux_calls == 1


def test_router_bias_stays_float32_under_bf16_cast_and_scores_are_float32():
    router = Router(_tiny_config(), _moe())
    router.expert_bias.fill_(1e-3 + 1e-6)
    router.bfloat16()
    # the weight follows the model dtype (one dtype for megatron's distributed-optimizer checkpoints);
    # the bias keeps float32 so that +-gamma steps survive, and the gates are computed in float32
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    _, gates = router(torch.randn(3, 2, router.weight.shape[1], dtype=torch.bfloat16))
    assert gates.dtype == torch.float32
    assert float(router.expert_bias[0]) == pytest.approx(1e-3 + 1e-6, rel=1e-6)
    assert set(router.state_dict()) == {"weight", "expert_bias"}


def test_placement_groups_follow_nodes():
    # EP group of 4 ranks at global ranks 0, 2, 4, 6 with 4 GPUs per node: ranks 0, 2 on node 0; 4, 6 on node 1
    g = placement_groups([0, 2, 4, 6], 16, 4)
    assert g.tolist() == [0] * 8 + [1] * 8
    # strided EP group (ranks 0, 4, 1, 5): nodes alternate, groups are not contiguous blocks of experts
    g = placement_groups([0, 4, 1, 5], 8, 4)
    assert g.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # selection with that order never leaves the token's best node
    torch.manual_seed(2)
    choice = torch.randn(20, 8)
    order = torch.argsort(g, stable=True)
    idx = group_limited_topk(choice, 3, 2, 1, 2, expert_order=order)
    for row, c in zip(idx, choice):
        node_scores = [c[g == n].topk(2)[0].sum() for n in (0, 1)]
        best = int(torch.stack(node_scores).argmax())
        assert all(int(g[e]) == best for e in row.tolist())


def test_float32_logits_keep_the_bf16_input_and_match_the_float32_linear():
    """The router's float32 logits from a bf16 input: forward and both gradients bit-identical to
    F.linear(x.float(), W.float()) under autograd, while backward keeps the bf16 x (not a float32 copy)."""
    import torch.nn.functional as F
    from megatron_dsv3.moe.router import float32_logits
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(8, 64, generator=g) * 0.1).bfloat16().requires_grad_()
    dl = torch.randn(37, 8, generator=g)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = float32_logits(x, w)
    assert all(t.dtype == torch.bfloat16 for t in kept) and out.dtype == torch.float32
    got = torch.autograd.grad(out, (x, w), dl)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear(x2.float(), w2.float())
    want = torch.autograd.grad(ref, (x2, w2), dl)
    assert torch.equal(out, ref)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
