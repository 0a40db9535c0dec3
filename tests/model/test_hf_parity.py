"""Whole-model parity with transformers' DeepseekV3ForCausalLM (MTP off: HF builds no MTP layer)."""
import pytest
import torch

from megatron_dsv3.model import build_model
from tests.model.common import hf_model, hf_to_ours, load_full, rel_err, small_config


@pytest.mark.parametrize("name,seq", [("no_q_lora", 24), ("yarn", 40)])
def test_logits_match_hf(mcore_single, name, seq):
    cfg = small_config(name)
    hf = hf_model(cfg)
    if cfg.mla.yarn is not None:   # the oracle really runs YaRN, beyond its original context
        assert hf.config.rope_parameters["rope_type"] == "yarn"
        assert seq > cfg.mla.yarn.original_max_position_embeddings
    ours = build_model(cfg, device="cpu").eval()
    load_full(ours, hf_to_ours(hf.state_dict(), cfg.num_layers))

    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits                  # [b, s, V]
        got = ours(ids)                                  # [b, s, V]
    assert got.shape == want.shape
    # float32 end to end, same math in a different order: ~1e-6 measured; 1e-4 leaves room for top-k ties
    assert rel_err(got, want) < 1e-4

    # per-token loss with labels = HF's cross entropy per position (MTP is off in this config)
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        loss = ours(ids, labels=labels)                  # [b, s]
    ref = torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten(), reduction="none").view_as(loss)
    assert rel_err(loss, ref) < 1e-4


def test_float32_checkpoint_builds_float32(mcore_single, tmp_path):
    """from_hf takes the build dtype from config.json (transformers 5 writes `dtype`): a float32 checkpoint is
    built in float32 and matches HF to float32 accuracy (built in bfloat16 it was ~2e-2 off)."""
    import json

    from megatron_dsv3.config import DSV3Config
    cfg = small_config("yarn")
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float32"
    ours_cfg = DSV3Config.from_hf(tmp_path)                  # no dtype override
    assert ours_cfg.params_dtype == "float32"
    ours = build_model(ours_cfg, device="cpu").eval()
    assert ours.output_layer.weight.dtype == torch.float32
    load_full(ours, hf_to_ours(hf.state_dict(), cfg.num_layers))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, ours(ids)
    # float32 on both sides: ~1e-6 measured (bfloat16 weights: ~2e-2)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)


def _packed_positions(lengths_per_row):
    """[[10, 6], [4, 12]] -> position_ids [2, 16]: 0..9, 0..5 / 0..3, 0..11 (positions reset per document)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def _document_mask(pos):
    """Megatron's boolean [b, 1, s, s] (True = masked): causal within each document (a position 0 starts one)."""
    doc = (pos == 0).cumsum(-1)                                            # [b, s] document index
    s = pos.shape[1]
    masked = (doc[:, :, None] != doc[:, None, :]) | torch.ones(s, s, dtype=torch.bool).triu(1)
    return masked[:, None]


def _parity(cfg, ids, pos, mask_kind, lengths=None):
    """(ours, HF) logits [b, s, V] with the same positions. "documents": the packed documents each run through HF
    alone (positions 0..n-1), concatenated; "causal": HF given the position_ids and one causal mask per row."""
    hf = hf_model(cfg)
    ours = build_model(cfg, device="cpu").eval()
    load_full(ours, hf_to_ours(hf.state_dict(), cfg.num_layers))
    with torch.no_grad():
        if mask_kind == "documents":   # packed documents: --reset-position-ids --reset-attention-mask
            want = torch.stack([torch.cat([hf(input_ids=doc[None]).logits[0] for doc in row.split(n)])
                                for row, n in zip(ids, lengths)])
            got = ours(ids, position_ids=pos, attention_mask=_document_mask(pos))
        else:                          # --reset-position-ids alone: one causal mask over the whole row
            # (an all-ones attention_mask: without one, transformers may infer document masks from the positions)
            want = hf(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
            got = ours(ids, position_ids=pos)
        plain = ours(ids)              # positions 0..s-1
    return got, want, plain


@pytest.mark.parametrize("name", ["yarn", "no_q_lora"])
@pytest.mark.parametrize("mask_kind", ["causal", "documents"])
def test_packed_document_positions_match_hf(mcore_single, name, mask_kind):
    cfg = small_config(name)
    lengths = [[10, 6], [4, 12]]
    pos = _packed_positions(lengths)
    ids = torch.randint(0, cfg.vocab_size, pos.shape, generator=torch.Generator().manual_seed(4))
    got, want, plain = _parity(cfg, ids, pos, mask_kind, lengths)
    # float32, same math: ~1e-6 measured
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    if mask_kind == "causal":
        # guard: the reset positions matter here (with the document mask rope's relative form hides them),
        # so dropping position_ids would fail the comparison above
        assert rel_err(plain, want) > 1e-3, rel_err(plain, want)


def test_positions_beyond_yarn_original_context_match_hf(mcore_single):
    """Through DSV3Model (the path training takes): positions far beyond YaRN's original context (16) and beyond
    max_position_embeddings (64), strided, different per sequence."""
    cfg = small_config("yarn")
    s = 24
    pos = torch.stack([torch.arange(s) + 1000, torch.arange(s) * 3 + 7])   # [b, s]
    ids = torch.randint(0, cfg.vocab_size, pos.shape, generator=torch.Generator().manual_seed(5))
    got, want, plain = _parity(cfg, ids, pos, "causal")
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert rel_err(plain, want) > 1e-3, rel_err(plain, want)   # the strided row changes relative distances


def test_positions_reach_layers_under_full_recompute(mcore_single):
    """megatron-core's full-layer recompute (--recompute-granularity full) forwards only rotary_pos_emb to the
    layers, not rotary_pos_cos/sin: the packed positions still reach every layer, in forward and recompute."""
    cfg = small_config("yarn")
    hf = hf_model(cfg)
    tc = cfg.to_transformer_config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    ours = build_model(cfg, transformer_config=tc, device="cpu").train()
    load_full(ours, hf_to_ours(hf.state_dict(), cfg.num_layers))
    pos = _packed_positions([[10, 6], [4, 12]])
    ids = torch.randint(0, cfg.vocab_size, pos.shape, generator=torch.Generator().manual_seed(6))
    labels = torch.roll(ids, -1, dims=1)
    loss = ours(ids, position_ids=pos, labels=labels)                     # [b, s]
    with torch.no_grad():
        want = hf(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
    ref = torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten(), reduction="none").view_as(loss)
    assert rel_err(loss.detach(), ref) < 1e-4, rel_err(loss.detach(), ref)
    loss.sum().backward()                                                 # runs the recompute
    assert all(p.grad is not None for p in ours.parameters())
