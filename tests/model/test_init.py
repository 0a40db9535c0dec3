"""Initialisation of the built model (DeepSeek-V3 section 4.2: every learnable parameter ~ N(0, 0.006)).

megatron-core's default divides the output projections' std by sqrt(2L); that is DSV3Config.scaled_output_init,
off by default. Every weight here has >= 8192 elements, so its sample std is within 3% of the target with
> 3.8 sigma to spare (relative std error of a std estimate: 1/sqrt(2N) <= 0.8%).
"""
import math

import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model import build_model

STD = 0.006
# megatron-core's output_layer_init_method targets: attention out, dense and shared-expert fc2, routed weight2
OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight",
                      "mlp.shared_experts.linear_fc2.weight", "mlp.experts.weight2")


def _config(**kw) -> DSV3Config:
    # the tiny preset, widened so that the smallest weight (the router, [E, h]) has 8192 elements
    return DSV3Config.from_preset("tiny", init_method_std=STD, hidden_size=256, moe={"num_experts": 32}, **kw)


@pytest.mark.parametrize("scaled", [False, True])
def test_weights_have_the_papers_std(mcore_single, scaled):
    torch.manual_seed(0)
    cfg = _config(scaled_output_init=scaled)
    model = build_model(cfg)
    scaled_std = STD / math.sqrt(2 * cfg.num_layers)
    seen_out, weights = set(), 0
    for name, p in model.named_parameters():
        if p.dim() == 1:   # RMSNorm gains (main, latent, MTP enorm/hnorm/final): ones
            assert name.endswith("norm.weight"), name
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        assert p.numel() >= 8192, (name, p.numel())
        is_out = name.endswith(OUTPUT_PROJECTIONS)
        if is_out:
            seen_out.add(next(s for s in OUTPUT_PROJECTIONS if name.endswith(s)))
        want = scaled_std if (scaled and is_out) else STD
        got = p.detach().double().std().item()
        assert abs(got / want - 1) < 0.03, (name, got, want)
        assert abs(p.detach().double().mean().item()) < 4 * want / math.sqrt(p.numel()), name
        weights += 1
    assert seen_out == set(OUTPUT_PROJECTIONS) and weights >= 20
    biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
    assert len(biases) == cfg.num_layers - cfg.moe.first_k_dense_replace + cfg.mtp.num_layers
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
