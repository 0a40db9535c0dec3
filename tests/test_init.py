"""megatron_dsv3/init.py: the paper's initialisation (DeepSeek-V3 section 4.2: every learnable weight ~ N(0, 0.006)),
the same values whatever the parallel layout, and a function of the seed.

megatron-core's default divides the output projections' std by sqrt(2L); that is DSV3Config.scaled_output_init,
off by default. Every weight here has >= 8192 elements, so its sample std is within 3% of the target with
> 3.8 sigma to spare (relative std error of a std estimate: 1/sqrt(2N) <= 0.8%).
"""
import math

import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model import build_model
from megatron_dsv3.testing import run_distributed

STD = 0.006
# megatron-core's output_layer_init_method targets: attention out, dense and shared-expert fc2, routed weight2
OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight",
                      "mlp.shared_experts.linear_fc2.weight", "mlp.experts.weight2")


def _config(**kw) -> DSV3Config:
    # the tiny preset, widened so that the smallest weight (the router, [E, h]) has 8192 elements
    return DSV3Config.from_preset("tiny", init_method_std=STD, hidden_size=256, moe={"num_experts": 32}, **kw)


@pytest.mark.parametrize("scaled", [False, True])
def test_weights_have_the_papers_std(mcore_single, scaled):
    cfg = _config(scaled_output_init=scaled)
    model = build_model(cfg, seed=0)
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
        w = p.detach().double()
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):   # vocabulary padding rows: zero
            assert torch.equal(w[cfg.vocab_size:], torch.zeros_like(w[cfg.vocab_size:])), name
            w = w[:cfg.vocab_size]
        got = w.std().item()
        assert abs(got / want - 1) < 0.03, (name, got, want)
        assert abs(w.mean().item()) < 4 * want / math.sqrt(w.numel()), name
        weights += 1
    assert seen_out == set(OUTPUT_PROJECTIONS) and weights >= 20
    biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
    assert len(biases) == cfg.num_layers - cfg.moe.first_k_dense_replace + cfg.mtp.num_layers
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_a_function_of_the_seed_only(mcore_single):
    """Same seed: bit-identical whatever torch's global RNG says; another seed: every weight differs; bf16 is the
    float32 draw cast (one draw, then the cast)."""
    cfg = DSV3Config.from_preset("tiny")
    torch.manual_seed(1)
    a = build_model(cfg, seed=5).state_dict()
    torch.manual_seed(2)
    b = build_model(cfg, seed=5).state_dict()
    c = build_model(cfg, seed=6).state_dict()
    bf = build_model(cfg.replace(params_dtype="bfloat16"), seed=5).state_dict()
    assert a.keys() == b.keys() == c.keys() == bf.keys()
    for k, v in a.items():
        if not torch.is_tensor(v):
            continue
        assert torch.equal(v, b[k]), k
        if v.dim() >= 2:
            assert not torch.equal(v, c[k]), k
        if k.endswith("expert_bias"):   # kept float32 in a bf16 model (router.py)
            assert torch.equal(bf[k], v), k
        else:
            assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], v.to(torch.bfloat16)), k


def test_uninitialised_tensors_are_refused(mcore_single):
    """A parameter the sharded state dict does not reach, or a name without a rule, raises."""
    from megatron_dsv3.init import init_weights
    cfg = DSV3Config.from_preset("tiny")
    model = build_model(cfg, init=False)
    model.stray = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(ValueError, match="stray"):
        init_weights(model, cfg, seed=0)
    del model.stray
    model.decoder.final_layernorm.register_buffer("scale", torch.empty(2))   # persistent: in the state dicts
    with pytest.raises(ValueError, match="final_layernorm.scale"):
        init_weights(model, cfg, seed=0)


def test_tensor_parallel_weights_are_marked(mcore_single):
    """megatron-core sets tensor_model_parallel / partition_dim / partition_stride inside the random init that
    build_model skips (0.16.1; 0.19 sets them itself, stride 2 on GLU weights): every weight carries what megatron's
    own init gives it (gradient-norm clipping reads them)."""
    from megatron_dsv3.model import DSV3Model
    cfg = DSV3Config.from_preset("tiny")
    ours = dict(build_model(cfg, seed=0, device="cpu").named_parameters())
    theirs = dict(DSV3Model(cfg).named_parameters())          # megatron's own CPU init
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")
    marked = [n for n, p in theirs.items() if getattr(p, "tensor_model_parallel", False)]
    assert "output_layer.weight" in marked and "decoder.layers.0.mlp.linear_fc2.weight" in marked
    for name, p in theirs.items():
        assert tuple(getattr(ours[name], a, None) for a in attrs) == tuple(getattr(p, a, None) for a in attrs), name


# ---- the same weights at every layout ---------------------------------------------------------------------------
SEED, CHUNK = 11, 4096    # 4096-element draws: the row-chunking (several chunks per weight, 1 expert each) is used
LAYOUTS = {  # name: (parallel overrides, parallel_state sizes), 2 ranks each
    "tp2sp": ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, dict(tp=2)),
    "pp2": ({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 1}, dict(pp=2)),
    "pp2vpp2": ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, dict(pp=2, vpp=2)),
    "ep2": ({"expert_model_parallel_size": 2}, dict(ep=2)),
}


def _layout_config(parallel=None) -> DSV3Config:
    # 1 dense + 3 MoE layers + MTP; vocab 400 pads to 448 at TP=1 and 512 at TP=2 (make_vocab_size_divisible_by 64)
    cfg = DSV3Config.from_preset("tiny").replace(num_layers=4, vocab_size=400)
    return cfg.replace(parallel=parallel) if parallel else cfg


def _chunks(cfg):
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    return [build_model(cfg, vp_stage=v, seed=SEED) for v in range(vpp)] if vpp else [build_model(cfg, seed=SEED)]


def _shards(chunks):
    from megatron_dsv3.init import _sharded_tensors
    return [(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.data.detach().clone())
            for c in chunks for sh in _sharded_tensors(c, None)]


def _shards_at_layouts(rank):
    from megatron_dsv3 import init
    from megatron_dsv3.launch import destroy_parallel_state, init_parallel_state
    init.CHUNK_NUMEL = CHUNK
    destroy_parallel_state()                       # run_distributed's TP=PP=EP=1
    out = {}
    for name, (parallel, sizes) in LAYOUTS.items():
        init_parallel_state(**sizes, seed=100 + rank)   # a different torch seed per rank: must not matter
        out[name] = _shards(_chunks(_layout_config(parallel)))
        destroy_parallel_state()
    init_parallel_state()
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) test; run with CUDA_VISIBLE_DEVICES=")
def test_the_same_weights_at_every_layout(mcore_single, monkeypatch):
    """Each rank's shard, at TP=2 + SP, PP=2 (1+3 layers), PP=2 x VPP=2 and EP=2, is bit-identical to the same
    place of the TP=PP=EP=1 model (the sharded state dict's global offsets), and together the ranks cover every
    global tensor; vocabulary padding rows are zero. Fails if a draw depended on the rank or the layout."""
    from megatron_dsv3 import init
    monkeypatch.setattr(init, "CHUNK_NUMEL", CHUNK)
    cfg = _layout_config()
    full = {}
    for key, shape, off, data in _shards(_chunks(cfg)):     # TP=1: the fused GLU weight comes as [gate; up]
        full.setdefault(key, torch.zeros(shape))[tuple(slice(o, o + n) for o, n in zip(off, data.shape))] = data
    results = run_distributed(_shards_at_layouts, 2)
    for name in LAYOUTS:
        covered = {key: 0 for key in full}
        for rank in range(2):
            for key, shape, off, data in results[rank][name]:
                ref = full[key]
                if shape != tuple(ref.shape):            # the vocabulary's padding differs with the TP size
                    assert key.endswith(("word_embeddings.weight", "output_layer.weight")) and shape[1:] == ref.shape[1:]
                    ref = torch.cat((ref[:cfg.vocab_size], ref.new_zeros(shape[0] - cfg.vocab_size, *shape[1:])))
                want = ref[tuple(slice(o, o + n) for o, n in zip(off, data.shape))]
                assert torch.equal(data, want), (name, rank, key, off)
                covered[key] += data.numel()
        # every global tensor is reached (replicated ones: once per rank holding them)
        assert all(n >= full[k][:cfg.vocab_size].numel() for k, n in covered.items()), (name, covered)
