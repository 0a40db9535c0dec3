"""PP=2 (uneven 1+3 layers, megatron-core's 1F1B), PP=2 x VPP=2 (interleaved 1F1B), TP=2 (with and without
sequence parallel) and EP=2 give the loss, MTP loss and gradients of PP=1, for the tiny preset (4 layers) with MTP
on (and the MoE balance loss on), with packed-document position_ids (each stage computes the rope from them).

Every run is one training step the way a trainer does it: megatron-core DDP around the model,
get_forward_backward_func() over 4 micro-batches, finalize_model_grads (DP all-reduce and the first/last stage
embedding-gradient all-reduce that ties MTP's embedding copy). With EP=2 the two ranks are data-parallel for the
dense parameters and take 2 different micro-batches each; the reference takes all 4.
"""
import functools

import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.testing import run_distributed

# megatron DDP allocates its gradient buffers on the GPU whenever one exists; these ranks are CPU/gloo
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) test; run with CUDA_VISIBLE_DEVICES=")

MICRO_BATCHES, B, S = 4, 2, 32

MODES = {  # name: (parallel overrides, run_distributed sizes)
    "pp2": ({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 1}, dict(pp=2)),
    "pp2vpp2": ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, dict(pp=2, vpp=2)),
    "tp2": ({"tensor_model_parallel_size": 2}, dict(tp=2)),
    "tp2sp": ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, dict(tp=2)),
    "ep2": ({"expert_model_parallel_size": 2}, dict(ep=2)),
}


def _config(parallel=None) -> DSV3Config:
    cfg = DSV3Config.from_preset("tiny").replace(num_layers=4, seq_length=S)   # 1 dense + 3 MoE layers
    return cfg.replace(parallel=parallel) if parallel else cfg


def _batches(seed=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, 384, (B, S + 1), generator=g)
        mask = (torch.rand(B, S, generator=g) > 0.1).float()
        # packed documents (--reset-position-ids): every stage must apply the same positions
        cut = int(torch.randint(4, S - 4, (1,), generator=g))
        pos = torch.cat((torch.arange(cut), torch.arange(S - cut)))[None].expand(B, S).contiguous()
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": mask,
                    "position_ids": pos})
    return out


def _loss_func(loss_mask, per_token_loss):
    total = (per_token_loss * loss_mask).sum()
    n = loss_mask.sum().to(torch.int)
    return total, n, {"lm loss": torch.stack((total.detach(), n.detach().float()))}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])
    return out, functools.partial(_loss_func, batch["loss_mask"])


def _shard_info(model):
    """our local parameter name -> (global name, megatron's TP partition dim or None, EP slice or None)."""
    from megatron.core import parallel_state as ps
    info = {}
    layer_global = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    for name, p in model.named_parameters():
        glob = name
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            glob = name.replace(f"decoder.layers.{i}.", f"decoder.layers.{layer_global[i]}.", 1)
        tp_dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        ep_slice = (ep_rank, ep) if ".mlp.experts.weight" in name else None
        info[name] = (glob, tp_dim, ep_slice)
    return info


def _shard(name, full, tp_dim, ep_slice, tp, tp_rank):
    """This rank's piece of a full (TP=EP=1) tensor."""
    if ep_slice is not None:
        full = full.chunk(ep_slice[1], dim=0)[ep_slice[0]]
    if tp_dim is None or tp == 1:
        return full
    if name.endswith("linear_fc1.weight"):   # megatron's GLU layout: [gate_r; up_r] on TP rank r
        gate, up = full.chunk(2, dim=0)
        return torch.cat((gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]))
    return full.chunk(tp, dim=tp_dim)[tp_rank]


def train_step(rank, parallel, state, batches):
    """One step on this rank; returns (loss sums, MTP report, {global name: local grad}, checkpoint keys)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_dsv3.model import build_model
    from megatron_dsv3.mtp import mtp_loss_report

    cfg = _config(parallel)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    # the gloo harness runs on the CPU, also on a machine with CUDA
    chunks = ([build_model(cfg, vp_stage=v, device="cpu") for v in range(vpp)] if vpp
              else [build_model(cfg, device="cpu")])
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    info, ddps, ckpt = {}, [], {}
    for i, model in enumerate(chunks):
        chunk_info = _shard_info(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                glob, tp_dim, ep_slice = chunk_info[name]
                p.copy_(_shard(glob, state[glob], tp_dim, ep_slice, tp, tp_rank))
            for name, buf in model.named_buffers():
                if name.endswith("expert_bias"):
                    glob = chunk_info[name.replace("expert_bias", "weight")][0].replace("weight", "expert_bias")
                    buf.copy_(state[glob])
        model.config.moe_router_enable_expert_bias = False  # our routers update their bias in their own hook
        # megatron's batched P2P under the interleaved schedule at PP=2: previous and next stage are the same
        # rank, and a batch's send-next/send-prev pairs arrive swapped (megatron's own GPTModel too; NCCL as
        # gloo). make_transformer_config sets Megatron-LM's unbatched, overlapped P2P for interleaving
        model.config.batch_p2p_comm = False
        ddps.append(DistributedDataParallel(model.config, DistributedDataParallelConfig(), model,
                                            disable_bucketing=i > 0))
        info.update({glob: v for glob, v in ((v[0], v) for v in chunk_info.values())})
        ckpt.update({k: (v.key, tuple(v.global_shape), tuple(v.global_offset), v.replica_id)
                     for k, v in model.sharded_state_dict().items() if hasattr(v, "global_shape")})

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = batches[dp_rank::dp]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=[iter(mine) for _ in chunks] if vpp else iter(mine),
        model=ddps, num_microbatches=len(mine), seq_length=S, micro_batch_size=B, forward_only=False)
    finalize_model_grads(ddps)
    grads = {}
    for model in chunks:
        names = _shard_info(model)
        grads.update({names[n][0]: p.main_grad.detach().clone() for n, p in model.named_parameters()})
    loss = torch.stack([d["lm loss"] for d in losses]).sum(0) if losses else None
    return {"ckpt": ckpt, "loss": loss, "mtp": mtp_loss_report(chunks, group=ps.get_data_parallel_group()),
            "grads": grads, "info": info, "tp_rank": tp_rank, "tp": tp}


@pytest.fixture(scope="module")
def reference():
    """PP=TP=EP=1 in this process: initial weights, batches, and the step's loss / MTP loss / grads."""
    from megatron_dsv3.testing import single_process
    batches = _batches()
    with single_process(seed=11):
        from megatron_dsv3.model import build_model
        state = {k: v.clone() for k, v in build_model(_config(), device="cpu").state_dict().items()
                 if not k.endswith("_extra_state")}
        with torch.no_grad():   # non-zero expert bias, so routing depends on loading it right
            for k in state:
                if k.endswith("expert_bias"):
                    state[k] = 0.01 * torch.randn(state[k].shape, generator=torch.Generator().manual_seed(1))
        ref = train_step(0, None, state, batches)
    return state, batches, ref


@pytest.mark.parametrize("mode", sorted(MODES))
def test_parallel_step_equals_single(reference, mode):
    state, batches, ref = reference
    parallel, sizes = MODES[mode]
    results = run_distributed(train_step, 2, parallel=parallel, state=state, batches=batches, timeout=240, **sizes)

    ref_loss = ref["loss"][0] / ref["loss"][1]
    with_loss = [r for r in results if r["loss"] is not None]
    assert with_loss, "no rank returned the loss"
    for r in with_loss:
        # EP=2: each DP rank reports its own micro-batches; the sums over ranks make up the reference's
        total = sum(x["loss"] for x in with_loss) if mode == "ep2" else r["loss"]
        assert abs(total[0] / total[1] - ref_loss) < 1e-5 * ref_loss
    mtp_reports = [r["mtp"] for r in results if r["mtp"]]
    assert mtp_reports and all(abs(m[1] - ref["mtp"][1]) < 1e-5 * ref["mtp"][1] for m in mtp_reports)

    emb = "embedding.word_embeddings.weight"
    if mode == "pp2":   # checkpoints store the embedding once: the last stage's MTP copy is a replica of it
        c0, c1 = results[0]["ckpt"][emb], results[1]["ckpt"][emb]
        assert c0[0] == c1[0] == emb and c0[3] == (0, 0, 0) and c1[3][0] == 1
    if mode.startswith("tp2"):   # MTP's TP-sharded weights are saved as halves of one tensor, like the decoder's
        for name in ("mtp.layers.0.eh_proj.weight",
                     "mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.weight",
                     "decoder.layers.1.self_attention.linear_q_up_proj.weight"):
            (k0, shape0, off0, _), (k1, shape1, off1, _) = results[0]["ckpt"][name], results[1]["ckpt"][name]
            assert k0 == k1 and shape0 == shape1 and off0 != off1, name

    # every parameter of the full model is on some rank with the reference's gradient (fp32, reordered sums)
    seen = set()
    for r in results:
        for glob, (_, tp_dim, ep_slice) in r["info"].items():
            want = _shard(glob, ref["grads"][glob], tp_dim, ep_slice, r["tp"], r["tp_rank"])
            got = r["grads"][glob]
            err = ((got - want).abs().max() / ref["grads"][glob].abs().max().clamp_min(1e-30)).item()
            assert err < 1e-4, (mode, glob, err)
            seen.add(glob)
    assert seen == set(ref["grads"])
