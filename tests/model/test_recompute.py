"""Recomputation as DeepSeek-V3 section 3.2.2: RMSNorm outputs (DSV3Config.recompute_norms, through megatron-core's
selective "layernorm" recompute of TransformerLayer) and MLA's latent norms + up-projections
(MLAConfig.recompute_up_proj) are not kept for backward but recomputed. Gradients are unchanged (float32, the same
ops; float32 sums of gradient contributions in another order: ~1e-7 relative), and the bytes the forward keeps
for backward fall."""
import pytest
import torch

from megatron_dsv3.config import DSV3Config


def _kept_bytes_and_grads(norms: bool, up_proj: bool):
    from megatron_dsv3.model import build_model
    cfg = DSV3Config.from_preset("tiny").replace(recompute_norms=norms, mla={"recompute_up_proj": up_proj},
                                                 seq_length=64)
    model = build_model(cfg, device="cpu", seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 64), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, None, None, labels=labels).mean()
    storages = {}
    for t in saved:       # storages still holding memory after the forward (a discarded norm output has size 0)
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    kept = sum(storages.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return kept, float(loss), grads, cfg


def test_recompute_keeps_gradients_and_frees_activations(mcore_single):
    base, loss0, g0, cfg = _kept_bytes_and_grads(False, False)
    norms, loss1, g1, _ = _kept_bytes_and_grads(True, False)
    both, loss2, g2, _ = _kept_bytes_and_grads(True, True)
    assert loss0 == loss1 == loss2
    for g in (g1, g2):
        assert g.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    tokens, layers = 2 * 64, cfg.num_layers + cfg.mtp.num_layers
    h = cfg.hidden_size
    # each of the 2 norms per layer keeps [tokens, h] float32 without recompute
    assert base - norms >= 2 * layers * tokens * h * 4 * 0.9, (base, norms)
    assert both < norms, (norms, both)
    print(f"kept bytes per token per layer: {base / tokens / layers:.0f} -> {norms / tokens / layers:.0f} (norms) "
          f"-> {both / tokens / layers:.0f} (+ MLA up-projections)")


def test_the_671b_preset_recomputes_as_the_paper():
    cfg = DSV3Config.from_preset("dsv3-671b")
    assert cfg.recompute_norms and cfg.mla.recompute_up_proj
    tc = cfg.to_transformer_config()
    assert tc.recompute_granularity == "selective" and "layernorm" in tc.recompute_modules
