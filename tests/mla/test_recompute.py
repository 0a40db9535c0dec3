"""MLAConfig.recompute_up_proj: same loss and gradients, fewer saved activation bytes."""
import dataclasses

import torch

from tests.mla.common import CONFIGS, build_ours, dsv3_config, full_state, hf_attention, load_ours, rel_err


def _saved_activation_bytes(module, fn):
    """Bytes of distinct storages saved for backward during fn(), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_recompute_same_grads_fewer_saved_bytes(mcore_single):
    mla, heads, hidden, seq = CONFIGS["v3_yarn"]
    hf, _ = hf_attention(mla, heads, hidden, seq)
    state = full_state(hf)
    x = torch.randn(seq, 2, hidden, generator=torch.Generator().manual_seed(3))
    results = {}
    for recompute in (False, True):
        ours = build_ours(dsv3_config(dataclasses.replace(mla, recompute_up_proj=recompute), heads, hidden))
        load_ours(ours, state)
        xi = x.clone().requires_grad_()
        out, nbytes = _saved_activation_bytes(ours, lambda: ours(xi)[0])
        loss = out.square().mean()
        loss.backward()
        results[recompute] = (loss.detach(), xi.grad, {k: p.grad for k, p in ours.named_parameters()}, nbytes)

    (l0, dx0, g0, b0), (l1, dx1, g1, b1) = results[False], results[True]
    # recompute runs the same float32 ops again: equal to float32 rounding (measured 0)
    assert rel_err(l1, l0) < 1e-6 and rel_err(dx1, dx0) < 1e-6
    assert all(rel_err(g1[k], g0[k]) < 1e-6 for k in g0)
    # s=40, b=2, q_lora=24, kv_lora=16, float32. Measured: 227,200 -> 200,960 bytes (-26,240, -11.5%), exactly
    # the normed latents (kept twice: by the norm's multiply and as the up-projection input) and the rsqrt
    # statistics of both norms. The rest (~88%) is q/k/v, the softmax probabilities of SDPA's CPU math path
    # [b, n, s, s] and the output projection's input, which recomputing the up-projections does not touch.
    print(f'saved activation bytes: {b0} -> {b1}')
    assert b1 < b0, (b0, b1)
    tokens = seq * 2
    assert b0 - b1 >= tokens * (24 + 16) * 4, (b0, b1)  # at least the two normed latents per token
