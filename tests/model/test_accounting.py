"""Parameter and FLOP counts (accounting.py) against the built model and torch's FlopCounterMode."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_dsv3.accounting import flops_breakdown, flops_per_token
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model import build_model


def test_parameter_counts_match_built_model(mcore_single):
    cfg = DSV3Config.from_preset("tiny").replace(mtp={"num_layers": 2})
    assert cfg.padded_vocab_size == cfg.vocab_size
    model = build_model(cfg, device="cpu")
    counts = cfg.parameter_counts()
    numel = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(numel.values()) == counts["total_with_mtp"]
    assert sum(v for n, v in numel.items() if n.startswith("mtp.")) == counts["mtp"]


def _count(cfg, b=2, s=16):
    model = build_model(cfg, device="cpu")
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        model(ids, labels=ids).sum().backward()
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}, b * s, s


def test_flops_match_flop_counter(mcore_single):
    # dense layers, MTP off: every linear is an mm (forward + 2 backward), attention runs as SDPA's math
    # bmm's on CPU, which compute the full s x s scores (FlopCounterMode counts them non-causal)
    cfg = DSV3Config.from_preset("tiny").replace(moe={"first_k_dense_replace": 3}, mtp={"num_layers": 0})
    counted, tokens, s = _count(cfg)
    f = flops_breakdown(cfg, s)
    assert counted["aten.mm"] == (f["total"] - f["attention"]) * tokens
    assert counted["aten.bmm"] * (s + 1) / (2 * s) == f["attention"] * tokens   # causal: (s+1)/2 keys per query

    # MoE layers + MTP depth 2: everything but the routed experts (whose CPU kernels are not plain mm's)
    # still counts exactly; the routed part is K_r SwiGLU experts per token in each MoE layer (incl. MTP's)
    cfg = DSV3Config.from_preset("tiny").replace(mtp={"num_layers": 2})
    counted, tokens, s = _count(cfg)
    f = flops_breakdown(cfg, s)
    moe, h = cfg.moe, cfg.hidden_size
    moe_layers = cfg.num_layers - moe.first_k_dense_replace + cfg.mtp.num_layers
    routed = 6 * moe.top_k * 3 * h * moe.expert_ffn_hidden_size * moe_layers
    assert counted["aten.mm"] == (f["total"] - f["attention"] - routed) * tokens
    assert f["total"] == flops_per_token(cfg, s) and f["main"] == flops_per_token(cfg, s, include_mtp=False)


def test_dsv3_671b_counts():
    cfg = DSV3Config.from_preset("dsv3-671b")
    c = cfg.parameter_counts()
    assert abs(c["total"] / 1e9 - 671) < 1 and abs(c["activated"] / 1e9 - 37) < 1   # the paper's 671B / 37B
    f = flops_breakdown(cfg, 4096)
    # attention: 61 + 1 layers x 3 (fwd+bwd) x 2 FLOPs x 128 heads x (192 + 128) dims x 4097/2 keys
    assert f["attention"] == 62 * 3 * 2 * 128 * (192 + 128) * 4097 / 2
    # the matmul part is 6 x activated parameters without the embedding lookup, norms (and the MTP layer)
    matmul_main = f["main"] - 61 * f["attention"] / 62
    assert abs(matmul_main / (6 * c["activated_non_embedding"]) - 1) < 1e-4
    assert 240e9 < f["main"] < 260e9
