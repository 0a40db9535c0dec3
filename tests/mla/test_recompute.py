"""MLAConfig.recompute_up_proj: same loss and gradients, fewer saved activation bytes."""
import dataclasses

import torch

from tests.mla.common import CONFIGS, build_ours, dsv3_config, full_state, hf_attention, load_ours, rel_err


def _saved_activation_bytes(module, fn, monkeypatch):
    """Bytes of distinct storages saved for backward during fn(), parameters excluded. Saved-tensor hooks nest
    (only the innermost runs), so what the attention core saves under RecomputedQKV's hook is counted there: the
    tensors it keeps as they are."""
    from megatron_dsv3.mla.attention import RecomputedQKV
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def record(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    inner = RecomputedQKV.pack
    monkeypatch.setattr(RecomputedQKV, "pack",
                        lambda self, t: (lambda r: record(r) if isinstance(r, torch.Tensor) else r)(inner(self, t)))
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _with_and_without(monkeypatch, seed, core=None):
    """{recompute: (loss, dx, parameter grads, saved bytes)} for the v3_yarn MLA, float32, s=40, b=2; `core`
    (a factory of a core attention module) replaces SDPAttention when given."""
    mla, heads, hidden, seq = CONFIGS["v3_yarn"]
    hf, _ = hf_attention(mla, heads, hidden, seq)
    state = full_state(hf)
    x = torch.randn(seq, 2, hidden, generator=torch.Generator().manual_seed(seed))
    results = {}
    for recompute in (False, True):
        ours = build_ours(dsv3_config(dataclasses.replace(mla, recompute_up_proj=recompute), heads, hidden))
        load_ours(ours, state)
        if core is not None:
            ours.core_attention = core(mla)
        xi = x.clone().requires_grad_()
        out, nbytes = _saved_activation_bytes(ours, lambda: ours(xi)[0], monkeypatch)
        loss = out.square().mean()
        loss.backward()
        results[recompute] = (loss.detach(), xi.grad, {k: p.grad for k, p in ours.named_parameters()}, nbytes)
    return results


def test_recompute_same_grads_fewer_saved_bytes(mcore_single, monkeypatch):
    mla, heads, hidden, seq = CONFIGS["v3_yarn"]
    results = _with_and_without(monkeypatch, 3)
    (l0, dx0, g0, b0), (l1, dx1, g1, b1) = results[False], results[True]
    # recompute runs the same float32 ops again: equal to float32 rounding (measured 0)
    assert rel_err(l1, l0) < 1e-6 and rel_err(dx1, dx0) < 1e-6
    assert all(rel_err(g1[k], g0[k]) < 1e-6 for k in g0)
    # float32, s=40, b=2. The recompute keeps the latents only: the attention core's saved q, k, v become a recipe
    # (made again from the latents in backward) and the normed latents (the up-projections' inputs) go too. SDPA's
    # CPU math path saves its own copies of q (scaled) and k (reshaped) besides v (a view of the kv up-projection's
    # output), so on CPU the kv storage and the normed latents are what leaves; a core that saves q, k, v as given
    # (cuDNN / flash on the GPU) loses all three: test_recompute_drops_what_the_core_saves below.
    print(f'saved activation bytes: {b0} -> {b1}')
    tokens = seq * 2
    assert b0 - b1 >= tokens * (heads * (mla.qk_nope_head_dim + mla.v_head_dim)
                                + mla.q_lora_rank + mla.kv_lora_rank) * 4, (b0, b1)


class _KeepsQKV(torch.autograd.Function):
    """Causal attention that saves q, k, v as given (as cuDNN / flash attention do) and nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    @staticmethod
    def backward(ctx, g):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ctx.scale)
        return (*torch.autograd.grad(out, (q, k, v), g), None)


class _CoreKeepingQKV(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, query, key, value, attention_mask=None, **_):
        sq, b, n, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))           # views: [b, n, s, d]
        out = _KeepsQKV.apply(q, k, v, self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def test_recompute_drops_what_the_core_saves(mcore_single, monkeypatch):
    """With a core attention that saves q, k, v (views of them) as the GPU kernels do, the recompute drops all of
    q, k, v: H (2 (d_h + d_h^R) + d_v) elements a token (131,072 bytes at V3 width), and gradients are unchanged."""
    mla, heads, hidden, seq = CONFIGS["v3_yarn"]
    results = _with_and_without(monkeypatch, 4, core=lambda m: _CoreKeepingQKV(m.softmax_scale()))
    (_, dx0, g0, b0), (_, dx1, g1, b1) = results[False], results[True]
    assert rel_err(dx1, dx0) < 1e-6 and all(rel_err(g1[k], g0[k]) < 1e-6 for k in g0)
    tokens = seq * 2
    qkv = tokens * heads * (2 * mla.qk_head_dim + mla.v_head_dim) * 4
    print(f'saved activation bytes with a q/k/v-keeping core: {b0} -> {b1} (q, k, v: {qkv})')
    assert b0 - b1 >= qkv, (b0, b1, qkv)
