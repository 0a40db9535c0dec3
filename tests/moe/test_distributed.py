"""DeepSeekMoE on several gloo ranks: expert parallelism (EP=2) equals EP=1 in outputs and gradients;
TP=2 x EP=2 (the routed work split over TP ranks) equals TP=1; EP=2 x DP=2 ends a step with uneven loads with
the identical, correctly updated expert bias on every rank. Reference on each rank: the same layer with
size-1 groups (TP = EP = 1) and the full weights."""
import pytest
import torch
import torch.distributed as dist

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.testing import run_distributed

E, H, F, K = 8, 32, 16, 3


def _cfg(tp=1, ep=1, sp=False, **moe) -> DSV3Config:
    return DSV3Config.from_preset("tiny", hidden_size=H, moe=dict(dict(
        num_experts=E, top_k=K, n_group=4, topk_group=2, num_shared_experts=2, expert_ffn_hidden_size=F,
        routed_scaling_factor=2.5, seq_aux_loss_coeff=1e-2), **moe),
        parallel=dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=sp))


def _build(cfg, pg_collection=None):
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.specs import get_moe_spec
    return build_module(get_moe_spec(cfg), config=cfg.to_transformer_config(), pg_collection=pg_collection)


def _reference(singles):
    """TP = EP = 1 layer (size-1 groups of this rank) with seeded random weights, identical on every rank."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    me = singles[dist.get_rank()]
    torch.manual_seed(0)
    ref = _build(_cfg(), ProcessGroupCollection(tp=me, ep=me, cp=me))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0, 0.3 if name == "router.weight" else 0.1)
        ref.router.expert_bias.normal_(0, 0.1)
    return ref


def _load_shards(layer, ref, tp_rank, tp, ep_rank, ep):
    """Full (reference) weights -> this rank's shards: experts by EP rank, shared MLP by TP rank
    (linear_fc1 holds [gate shard; up shard] per TP rank, megatron's GLU layout)."""
    El, w = E // ep, 2 * F // tp                          # local experts; shared width per TP rank (2 shared)
    with torch.no_grad():
        layer.router.weight.copy_(ref.router.weight)
        layer.router.expert_bias.copy_(ref.router.expert_bias)
        layer.experts.weight1.copy_(ref.experts.weight1[ep_rank * El:(ep_rank + 1) * El])
        layer.experts.weight2.copy_(ref.experts.weight2[ep_rank * El:(ep_rank + 1) * El])
        gate, up = ref.shared_experts.linear_fc1.weight.chunk(2, dim=0)
        layer.shared_experts.linear_fc1.weight.copy_(torch.cat([gate[tp_rank * w:(tp_rank + 1) * w],
                                                                up[tp_rank * w:(tp_rank + 1) * w]]))
        layer.shared_experts.linear_fc2.weight.copy_(ref.shared_experts.linear_fc2.weight[:, tp_rank * w:(tp_rank + 1) * w])


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(g)
    return out.detach(), x.grad


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _parity(rank, tp, ep, token_seed, sp=False):
    """Errors of the TP x EP layer against the reference, on this rank's tokens. With sequence parallelism
    (sp) each TP rank holds s/tp positions of the sequences; the router weight gradient is then summed over TP
    (what megatron's finalize_model_grads does for params marked sequence_parallel)."""
    from megatron.core import parallel_state as ps
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    ref = _reference(singles)
    layer = _build(_cfg(tp, ep, sp))
    tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    _load_shards(layer, ref, tp_rank, tp, ep_rank, ep)
    torch.manual_seed(100 + token_seed)
    x, g = torch.randn(6, 4, H), torch.randn(6, 4, H)        # [s, b, h]
    out_ref, dx_ref = _run(ref, x, g)
    if sp:
        lo, hi = 6 * tp_rank // tp, 6 * (tp_rank + 1) // tp
        out_ref, dx_ref = out_ref[lo:hi], dx_ref[lo:hi]
        out, dx = _run(layer, x[lo:hi], g[lo:hi])
        dist.all_reduce(layer.router.weight.grad, group=ps.get_tensor_model_parallel_group())
        aux = layer.router._aux_sum.clone()                  # tp x this rank's part: the mean over TP is the loss
        dist.all_reduce(aux, group=ps.get_tensor_model_parallel_group())
        aux = aux / tp
    else:
        out, dx = _run(layer, x, g)
        aux = layer.router._aux_sum
    # expert gradients: each owner sees the tokens of its whole EP group, each token once
    ep_group = ps.get_expert_model_parallel_group()
    seeds = [None] * dist.get_world_size(ep_group)
    dist.all_gather_object(seeds, token_seed, group=ep_group)
    dw1, dw2 = ref.experts.weight1.grad.clone(), ref.experts.weight2.grad.clone()
    if len(set(seeds)) > 1:                                  # different tokens on the EP ranks: sum their grads
        assert len(set(seeds)) == len(seeds)
        dist.all_reduce(dw1, group=ep_group)
        dist.all_reduce(dw2, group=ep_group)
    El = E // ep
    gate, up = ref.shared_experts.linear_fc1.weight.grad.chunk(2, dim=0)
    w = 2 * F // tp
    return {
        "out": _rel(out, out_ref), "dx": _rel(dx, dx_ref),
        "router": _rel(layer.router.weight.grad, ref.router.weight.grad),
        "w1": _rel(layer.experts.weight1.grad, dw1[ep_rank * El:(ep_rank + 1) * El]),
        "w2": _rel(layer.experts.weight2.grad, dw2[ep_rank * El:(ep_rank + 1) * El]),
        "shared_fc1": _rel(layer.shared_experts.linear_fc1.weight.grad,
                           torch.cat([gate[tp_rank * w:(tp_rank + 1) * w], up[tp_rank * w:(tp_rank + 1) * w]])),
        "aux": abs(float(aux) - float(ref.router._aux_sum)) / float(ref.router._aux_sum),
        # this rank's share of routed tokens; summed over TP they are the reference's counts
        "counts": layer.router.tokens_per_expert.clone(), "counts_ref": ref.router.tokens_per_expert.clone(),
        "tp_rank": tp_rank,
    }


def _ep2(rank, ckpt):
    res = _parity(rank, tp=1, ep=2, token_seed=rank)
    # distributed checkpoint of the EP=2 layer (weights = the reference's shards), reloaded later at TP2 x EP2
    from megatron.core import dist_checkpointing
    torch.manual_seed(0)
    layer = _build(_cfg(1, 2))
    ref = _reference([dist.new_group([r]) for r in range(dist.get_world_size())])
    _load_shards(layer, ref, 0, 1, rank, 2)
    # the harness's rank processes are daemonic; megatron's async writer starts a multiprocessing Manager
    import multiprocessing
    multiprocessing.current_process()._config["daemon"] = False
    dist_checkpointing.save(layer.sharded_state_dict(prefix="mlp."), ckpt)
    return res


def _check_loaded(layer, ckpt, tp_rank, tp, ep_rank, ep):
    """Load the EP=2 checkpoint into this (differently sharded) layer; compare with the reference's shards."""
    from megatron.core import dist_checkpointing
    loaded = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), ckpt)
    layer.load_state_dict({k[len("mlp."):]: v for k, v in loaded.items()}, strict=False)
    torch.manual_seed(0)
    expected = _build(_cfg(tp, ep))
    _load_shards(expected, _reference([dist.new_group([r]) for r in range(dist.get_world_size())]),
                 tp_rank, tp, ep_rank, ep)
    got, want = layer.state_dict(), expected.state_dict()
    return all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))


def _ep2_dp2_then_tp2_ep2(rank, ckpt):
    """World 4. Part 1: TP=1, EP=2, DP=4 (EP=2 x expert-DP=2): uneven loads, one bias update.
    Part 2: parallel state re-initialised as TP=2, EP=2 (EP group == TP group): parity of the split routed work."""
    from megatron.core import parallel_state as ps
    from megatron_dsv3.moe.router import apply_expert_bias_update
    from megatron_dsv3.testing import destroy_parallel_state, init_parallel_state

    torch.manual_seed(0)
    layer = _build(_cfg(tp=1, ep=2))
    skew = torch.zeros(H)
    skew[: 4 * (rank + 1)] = 1.0 + rank                      # every rank sees a different skew
    torch.manual_seed(10 + rank)
    for _ in range(2):                                       # two micro-batches, then the global-batch hook
        x = torch.randn(8, 2, H) + skew
        out, _ = layer(x)
        out.square().mean().backward()
    local_counts = layer.router.tokens_per_expert.clone()
    metrics = apply_expert_bias_update([layer], rate=1e-3)
    part1 = {"counts": local_counts, "bias": layer.router.expert_bias.clone(), "metrics": metrics,
             "reset": int(layer.router.tokens_per_expert.sum())}
    # node-limited routing by placement: one EP rank per node -> 2 groups = the 2 ranks' experts; M = 1 node
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.specs import get_moe_spec
    cfg = _cfg(1, 2, node_limited_by_placement=True, n_group=2, topk_group=1)
    nodes = {}
    for per_node in (1, 2):
        limited = build_module(get_moe_spec(cfg), config=cfg.to_transformer_config(), ranks_per_node=per_node)
        idx, _ = limited.router(torch.randn(8, 2, H) + skew)
        owner = idx // (E // 2)                              # EP rank holding each chosen expert [T, k]
        nodes[per_node] = (limited.router.n_group, bool((owner == owner[:, :1]).all()))
    part1["nodes"] = nodes

    destroy_parallel_state()
    init_parallel_state(tp=2, ep=2)
    ep_ranks = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
    tp_ranks = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
    part2 = _parity(rank, tp=2, ep=2, token_seed=rank // 2)  # the TP pair holds the same tokens
    part2["ep_is_tp"] = ep_ranks == tp_ranks
    sp = _parity(rank, tp=2, ep=2, token_seed=rank // 2, sp=True)
    torch.manual_seed(1)                                     # different weights, then the checkpoint's
    part2["ckpt_loaded"] = _check_loaded(_build(_cfg(2, 2)), ckpt, ps.get_tensor_model_parallel_rank(), 2,
                                         ps.get_expert_model_parallel_rank(), 2)
    return part1, part2, sp


def _check_parity(results, tol=1e-5):
    for r, res in enumerate(results):
        for key in ("out", "dx", "router", "w1", "w2", "shared_fc1", "aux"):
            assert res[key] < tol, f"rank {r}: {key} relative error {res[key]:.2e}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) test; run with CUDA_VISIBLE_DEVICES=")
def test_moe_distributed(tmp_path):
    from megatron_dsv3.moe.router import update_expert_bias

    ckpt = str(tmp_path / "ckpt")
    import os
    os.makedirs(ckpt)
    # EP = 2 on 2 ranks (different tokens per rank) == EP = 1
    ep2 = run_distributed(_ep2, 2, ep=2, ckpt=ckpt)
    _check_parity(ep2)                                       # float32: 1e-5 relative
    for res in ep2:
        assert torch.equal(res["counts"], res["counts_ref"])

    part1, part2, part_sp = zip(*run_distributed(_ep2_dp2_then_tp2_ep2, 4, ep=2, ckpt=ckpt))
    # EP2 x DP2: uneven loads, identical bias everywhere, equal to the equation on the summed loads
    counts = torch.stack([p["counts"] for p in part1])
    assert len({tuple(c.tolist()) for c in counts}) == 4     # every rank's load differs
    total = counts.sum(0)
    expected = update_expert_bias(torch.zeros(E), total, 1e-3)
    for p in part1:
        assert torch.equal(p["bias"], part1[0]["bias"])
        assert torch.equal(p["bias"], expected)
        m = p["metrics"]["router"]
        assert torch.equal(m["tokens_per_expert"], total.double()) and p["reset"] == 0
        assert abs(m["max_vio"] - float((total.max() - total.float().mean()) / total.float().mean())) < 1e-9
        assert m["bias_spread"] > 0 and m["aux_loss"] > 0
    assert int(total.sum()) == 4 * 2 * 16 * K                # ranks x micro-batches x tokens x k
    for p in part1:
        assert p["nodes"][1] == (2, True)                     # 2 nodes: each token's k experts on one EP rank
        assert p["nodes"][2][0] == 1                          # both EP ranks on one node: no limit
    # TP2 x EP2: routed work split over the TP pair == TP = EP = 1
    assert all(p["ep_is_tp"] for p in part2)
    # the EP=2 distributed checkpoint reloads at TP=2 x EP=2 (experts by EP rank, shared MLP resharded over TP)
    assert all(p["ckpt_loaded"] for p in part2)
    _check_parity(part2)
    for a, b in ((part2[0], part2[1]), (part2[2], part2[3])):
        assert torch.equal(a["counts"] + b["counts"], a["counts_ref"])
    # TP2 (sequence parallel) x EP2: each TP rank routes its own half of every sequence; the sequence-wise
    # balance loss sums its counts over TP so the partial losses add up to the whole sequences' loss
    _check_parity(part_sp)
    for a, b in ((part_sp[0], part_sp[1]), (part_sp[2], part_sp[3])):
        assert torch.equal(a["counts"] + b["counts"], a["counts_ref"])


def _stage_groups(rank, ckpt=None):
    """World 4, parallel_state DP=4 (its tensor-and-data-parallel group is WORLD), but the layers are built with a
    pg_collection of PP=2 x EP=2: stages {0, 1} and {2, 3}. Everything must follow the pg_collection."""
    import os
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron_dsv3.moe.router import apply_expert_bias_update

    stages = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    singles = [dist.new_group([r]) for r in range(4)]
    stage, me = stages[rank // 2], singles[rank]
    pgs = ProcessGroupCollection(tp=me, pp=pps[rank % 2], cp=me, tp_cp=me, ep=stage, expt_tp=me, expt_dp=me,
                                 dp=stage, dp_cp=stage, tp_dp_cp=stage)
    out = {}

    def step(layer, seed):
        skew = torch.zeros(H)
        skew[: 4 * (rank + 1)] = 1.0 + rank                  # every rank sees a different skew,
        skew *= 1 if rank < 2 else -1                        # the stages opposite ones (other experts overloaded)
        torch.manual_seed(seed)
        for _ in range(2):                                   # two micro-batches, then the global-batch hook
            layer(torch.randn(8, 2, H) + skew)
        return layer.router.tokens_per_expert.clone()

    torch.manual_seed(0)
    layer = _build(_cfg(ep=2), pgs)
    out["counts"] = step(layer, 10 + rank)
    out["metrics"] = apply_expert_bias_update([layer], rate=1e-3)["router"]["tokens_per_expert"]
    out["bias"] = layer.router.expert_bias.clone()
    # an explicit group wins over the routers' own
    out["counts2"] = step(layer, 20 + rank)
    out["metrics2"] = apply_expert_bias_update([layer], rate=0.0, group=dist.group.WORLD)["router"]["tokens_per_expert"]
    # the experts' checkpoint replicas follow pg_collection's expert-tensor/data-parallel ranks
    out["replica"] = layer.experts.sharded_state_dict(prefix="mlp.experts.")["mlp.experts.weight1"].replica_id

    # a router whose layer's pg_collection has no tp_dp_cp: a clear error, no collective, then group= works
    torch.manual_seed(0)
    unknown = _build(_cfg(), ProcessGroupCollection(tp=me, ep=me, cp=me))
    out["counts3"] = step(unknown, 30 + rank)
    try:
        apply_expert_bias_update([unknown], rate=1e-3)
        out["no_group_error"] = None
    except ValueError as e:
        out["no_group_error"] = str(e)
    out["metrics3"] = apply_expert_bias_update([unknown], rate=1e-3, group=stage)["router"]["tokens_per_expert"]

    # node-limited routing by placement: ranks per node given, or LOCAL_WORLD_SIZE from the launcher, else an error
    cfg = _cfg(ep=2, node_limited_by_placement=True, n_group=2, topk_group=1)
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    try:
        _build(cfg, pgs)
        out["placement_error"] = None
    except ValueError as e:
        out["placement_error"] = str(e)
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    out["n_group_env"] = _build(cfg, pgs).router.n_group
    del os.environ["LOCAL_WORLD_SIZE"]
    from megatron.core.transformer.spec_utils import build_module
    from megatron_dsv3.specs import get_moe_spec
    out["n_group_arg"] = build_module(get_moe_spec(cfg), config=cfg.to_transformer_config(), pg_collection=pgs,
                                      ranks_per_node=2).router.n_group
    return out


def test_groups_come_from_pg_collection():
    """Bias update, expert checkpoint replicas and node placement take their groups from the layer's pg_collection
    (PP=2 x EP=2 on 4 ranks), never from parallel_state or WORLD; unknown groups are clear errors."""
    from megatron_dsv3.moe.router import update_expert_bias

    res = run_distributed(_stage_groups, 4)
    counts = torch.stack([r["counts"] for r in res])
    assert len({tuple(c.tolist()) for c in counts}) == 4     # every rank's load differs
    world = counts.sum(0)
    for s, ranks in enumerate(([0, 1], [2, 3])):
        stage = counts[ranks].sum(0)
        expected = update_expert_bias(torch.zeros(E), stage, 1e-3)
        # the case separates the groups: WORLD's sum (the other stage's counts mixed in) moves the bias otherwise
        assert not torch.equal(expected, update_expert_bias(torch.zeros(E), world, 1e-3)), s
        for r in ranks:
            assert torch.equal(res[r]["metrics"], stage.double())
            assert torch.equal(res[r]["bias"], expected)
            assert torch.equal(res[r]["metrics3"], torch.stack([res[q]["counts3"] for q in ranks]).sum(0).double())
    world2 = torch.stack([r["counts2"] for r in res]).sum(0).double()
    for r in res:
        assert torch.equal(r["metrics2"], world2)
        assert r["replica"] == (0, 0, 0)                     # expt_dp of size 1 (parallel_state's has 4 ranks)
        err = r["no_group_error"]
        assert err is not None and "tp_dp_cp" in err and "group=" in err, err
        err = r["placement_error"]
        assert err is not None and "ranks_per_node" in err and "LOCAL_WORLD_SIZE" in err, err
        assert r["n_group_env"] == 2                          # one rank per node: the stage's 2 EP ranks, 2 nodes
        assert r["n_group_arg"] == 1                          # both EP ranks of the stage on one node


def _no_tokens_for_one_rank(rank):
    """EP=2: every token of both ranks picks experts of EP rank 1, so rank 0's experts receive nothing. The
    backward must still run both all-to-alls on both ranks (they are collectives) and give EP=1's gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron_dsv3.moe.dispatch import dispatch_combine
    from megatron_dsv3.moe.experts import padded_swiglu

    E, h, f, T, k = 4, 8, 6, 5, 2
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(E, h, 2 * f, generator=g, dtype=torch.float64), torch.randn(E, f, h, generator=g, dtype=torch.float64)
    xs = [torch.randn(T, h, generator=g, dtype=torch.float64) for _ in range(2)]
    idx = torch.tensor([[2, 3]] * T)                       # experts 2 and 3 live on EP rank 1
    gates = torch.full((T, k), 0.5, dtype=torch.float32)
    # EP=1 reference of this rank's tokens (all experts here)
    # EP=1 reference over both ranks' tokens (the experts' gradients sum over every sender)
    x_ref, w1_ref, w2_ref = (t.clone().requires_grad_() for t in (torch.cat(xs), w1, w2))
    dispatch_combine(x_ref, torch.cat([idx, idx]), torch.cat([gates, gates]),
                     lambda x, c, s: padded_swiglu(x, c, w1_ref, w2_ref, s), E).sum().backward()
    # EP=2: this rank holds experts [2*rank, 2*rank+2)
    x = xs[rank].clone().requires_grad_()
    lw1 = w1[2 * rank:2 * rank + 2].clone().requires_grad_()
    lw2 = w2[2 * rank:2 * rank + 2].clone().requires_grad_()
    out = dispatch_combine(x, idx, gates, lambda x_, c, s: padded_swiglu(x_, c, lw1, lw2, s), E,
                           ep_group=ps.get_expert_model_parallel_group())
    out.sum().backward()
    dist.barrier()
    return {"x": (x.grad - x_ref.grad[rank * T:(rank + 1) * T]).abs().max().item(),
            "w1": (lw1.grad - w1_ref.grad[2 * rank:2 * rank + 2]).abs().max().item()}


def test_backward_when_an_ep_rank_receives_no_token():
    # before the fix, rank 0 skipped one backward all-to-all and the ranks' collectives went out of step
    results = run_distributed(_no_tokens_for_one_rank, 2, ep=2, timeout=120)
    for r in results:
        assert r["x"] < 1e-12 and r["w1"] < 1e-12, r
