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
    ours = build_model(cfg).eval()
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
