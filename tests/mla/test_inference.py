"""Absorbed attention with the compressed cache (prefill + token-by-token decode) equals the training path.

float32, max rel error < 1e-5 (different association of the same products; measured ~1e-7).
"""
import pytest
import torch

from megatron_dsv3.mla.inference import LatentKVCache, absorbed_attention
from tests.mla.common import CONFIGS, build_ours, dsv3_config, full_state, hf_attention, load_ours, rel_err


@pytest.mark.parametrize("name", ["v3_yarn", "odd_halfsplit", "v2lite_noq"])
def test_absorbed_decode_equals_plain_forward(mcore_single, name):
    mla, heads, hidden, seq = CONFIGS[name]
    hf, _ = hf_attention(mla, heads, hidden, seq)
    ours = build_ours(dsv3_config(mla, heads, hidden))
    load_ours(ours, full_state(hf))
    ours.eval()
    x = torch.randn(seq, 2, hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = ours(x)
    cache = LatentKVCache.empty(ours, batch=2, max_seq=seq)
    assert cache.numel_per_token() == mla.kv_lora_rank + mla.qk_rope_head_dim
    prefill = seq // 2
    outs = [absorbed_attention(ours, x[:prefill], cache)]
    for t in range(prefill, seq):  # one token at a time
        outs.append(absorbed_attention(ours, x[t:t + 1], cache))
    assert cache.length == seq
    err = rel_err(torch.cat(outs), ref)
    print(f"{name}: absorbed vs plain {err:.2e}")
    assert err < 1e-5
