"""MTP loss and gradients against a reference written from DeepSeek-V3 section 2.2 (eqs. 21-25).

The reference does not call our modules: the main model and each TRM_k are transformers' DeepseekV3 modules
(an independent implementation of the same layer), everything MTP-specific is plain float64 torch written
from the paper, in its own form: depth k runs on the truncated sequence 1..T-k (eq. 22) instead of our
shifted-and-masked full sequence.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.model import build_model
from megatron_dsv3.mtp import mtp_loss_report, set_mtp_backward_scale, set_mtp_loss_weight
from tests.model.common import LAYER_MAP, hf_model, hf_to_ours, rel_err, small_config


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class PaperMTP(torch.nn.Module):
    """D MTP modules as parameters + HF decoder layers for TRM_k."""

    def __init__(self, hf, D, seed=5):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
        hc, h, L = hf.config, hf.config.hidden_size, hf.config.num_hidden_layers
        g = torch.Generator().manual_seed(seed)
        self.enorm = torch.nn.ParameterList([1 + 0.2 * torch.randn(h, generator=g, dtype=torch.float64) for _ in range(D)])
        self.hnorm = torch.nn.ParameterList([1 + 0.2 * torch.randn(h, generator=g, dtype=torch.float64) for _ in range(D)])
        self.final = torch.nn.ParameterList([1 + 0.2 * torch.randn(h, generator=g, dtype=torch.float64) for _ in range(D)])
        self.M = torch.nn.ParameterList([torch.randn(h, 2 * h, generator=g, dtype=torch.float64) * (2 * h) ** -0.5
                                         for _ in range(D)])
        self.trm = torch.nn.ModuleList([DeepseekV3DecoderLayer(hc, layer_idx=L + k) for k in range(D)])
        with torch.no_grad():
            for name, p in self.trm.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        self.double()
        self.eps = hc.rms_norm_eps

    def ours_state(self, grads: bool = False):
        """Our names (mtp.layers.{k}.*) -> these parameters (or their gradients)."""
        get = (lambda p: p.grad) if grads else (lambda p: p)
        out = {}
        for k in range(len(self.M)):
            pre = f"mtp.layers.{k}."
            out[pre + "enorm.weight"] = get(self.enorm[k])
            out[pre + "hnorm.weight"] = get(self.hnorm[k])
            out[pre + "eh_proj.weight"] = get(self.M[k])
            out[pre + "final_layernorm.weight"] = get(self.final[k])
            layer = {f"model.layers.0.{n}": get(p) for n, p in self.trm[k].named_parameters()}
            if not grads:
                layer.update({f"model.layers.0.{n}": b for n, b in self.trm[k].named_buffers()})
            for n, v in hf_to_ours(_with_globals(layer), 1).items():
                if n.startswith("decoder.layers.0."):
                    out[pre + "transformer_layer." + n[len("decoder.layers.0."):]] = v
        return out


def _with_globals(layer_state):
    dummy = torch.zeros(1)
    return dict(layer_state, **{"model.embed_tokens.weight": dummy, "model.norm.weight": dummy, "lm_head.weight": dummy})


def paper_losses(hf, mtp: PaperMTP, ids, labels, mask, lam, pos=None, mtp_pos=None):
    """(L_main, [L^1..L^D], total = L_main + lam/D sum_k L^k). labels[i] = t_{i+1}; mask [b, s] in {0, 1}.
    pos [b, s]: rope positions (None: 0..s-1), one causal mask per row; TRM_k at position i uses position i's
    rope (mtp_pos, default pos: only the guard below gives it other positions)."""
    b, s = ids.shape
    D = len(mtp.M)
    if pos is None:
        pos = torch.arange(s)[None].expand(b, s)
    mtp_pos = pos if mtp_pos is None else mtp_pos
    # an all-ones attention_mask keeps HF's mask causal (it may infer document masks from reset positions)
    h0 = hf.model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).last_hidden_state
    ce = F.cross_entropy(hf.lm_head(h0).flatten(0, 1), labels.flatten(), reduction="none").view(b, s)
    main = (ce * mask).sum() / mask.sum()
    cos, sin = hf.model.rotary_emb(h0, mtp_pos)
    neg = torch.finfo(torch.float64).min
    losses, h_prev = [], h0
    for k in range(1, D + 1):
        T = s - k                                                     # positions with a target t_{i+k+1}
        emb = hf.model.embed_tokens(ids[:, k:])                       # Emb(t_{i+k}), i < T   [b, T, h]
        x = torch.cat((_rms(emb, mtp.enorm[k - 1], mtp.eps), _rms(h_prev[:, :T], mtp.hnorm[k - 1], mtp.eps)), -1)
        x = x @ mtp.M[k - 1].T                                        # eq. 21
        causal = torch.zeros(1, 1, T, T, dtype=torch.float64).masked_fill(
            torch.ones(T, T, dtype=torch.bool).triu(1), neg)
        h_k = mtp.trm[k - 1](x, attention_mask=causal, position_embeddings=(cos[:, :T], sin[:, :T]))  # eq. 22
        logits = hf.lm_head(_rms(h_k, mtp.final[k - 1], mtp.eps))   # eq. 23, shared head
        ce_k = F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), reduction="none").view(b, T)
        m = mask[:, k:]
        losses.append((ce_k * m).sum() / m.sum())                     # eq. 24
        h_prev = h_k
    return main, losses, main + lam / D * sum(losses)                 # eq. 25


def _packed(s):
    """position_ids [2, s] of packed documents: positions restart at each document (--reset-position-ids)."""
    return torch.stack([torch.cat((torch.arange(12), torch.arange(s - 12))),
                        torch.cat((torch.arange(5), torch.arange(s - 5)))])


@pytest.mark.parametrize("D, packed", [(1, False), (2, False), (2, True)])
def test_mtp_matches_paper_reference(mcore_single, D, packed):
    cfg = small_config("yarn").replace(params_dtype="float64", mtp={"num_layers": D, "loss_weight": ((0, 0.3),)},
                                       moe={"seq_aux_loss_coeff": 0.0})
    lam, b, s = 0.25, 2, 20
    hf = hf_model(cfg).double()
    ref_mtp = PaperMTP(hf, D)
    ours = build_model(cfg, device="cpu")
    state = hf_to_ours(hf.state_dict(), cfg.num_layers)
    state.update({k: v.detach().clone() for k, v in ref_mtp.ours_state().items()})
    own = ours.state_dict()
    assert set(k for k in own if not k.endswith("_extra_state")) == set(state)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.2).double()

    pos = _packed(s) if packed else None
    main_ref, depth_ref, total_ref = paper_losses(hf, ref_mtp, ids, labels, mask, lam, pos)
    total_ref.backward()
    if packed:   # guard: MTP layers attending at positions 0..s-1 would be caught by the 1e-6 comparison below
        with torch.no_grad():
            _, depth_wrong, _ = paper_losses(hf, ref_mtp, ids, labels, mask, lam, pos,
                                             mtp_pos=torch.arange(s)[None].expand(b, s))
        assert all(abs(w.item() - r.item()) > 1e-4 * r.item() for w, r in zip(depth_wrong, depth_ref))

    set_mtp_loss_weight(ours, lam)
    set_mtp_backward_scale(1.0)
    per_token = ours(ids, position_ids=pos, labels=labels, loss_mask=mask)   # [b, s], main loss only
    main = (per_token * mask).sum() / mask.sum()
    main.backward()                                                   # + lam/D sum_k L^k via the auto-scaler
    depth = mtp_loss_report(ours)

    # float64 on both sides except RMSNorm statistics and router scores, which both compute in float32
    # (as DeepSeek's reference): ~1e-7 relative measured
    assert abs(main.item() - main_ref.item()) < 1e-6 * main_ref.item()
    assert sorted(depth) == list(range(1, D + 1))
    for k in range(1, D + 1):
        assert abs(depth[k] - depth_ref[k - 1].item()) < 1e-6 * depth_ref[k - 1].item()

    ref_grads = hf_to_ours({n: p.grad for n, p in hf.named_parameters()}, cfg.num_layers)
    ref_grads.update(ref_mtp.ours_state(grads=True))
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(ours_grads) == set(ref_grads)
    worst = max(rel_err(ours_grads[n], ref_grads[n]) for n in ours_grads)
    assert worst < 1e-5, worst

    # the shared embedding and head really receive gradient from both losses: ours minus the main-only part
    hf.zero_grad()
    main_ref2, _, _ = paper_losses(hf, ref_mtp, ids, labels, mask, lam, pos)
    main_ref2.backward()
    for ours_name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                               ("output_layer.weight", "lm_head.weight")):
        mtp_part = ours_grads[ours_name] - dict(hf.named_parameters())[hf_name].grad
        assert mtp_part.abs().max() > 1e-3 * ours_grads[ours_name].abs().max(), ours_name
