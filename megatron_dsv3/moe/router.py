"""The DeepSeekMoE router: everything about choosing experts, in one place.

DeepSeek-V3 technical report, section 2.1.2:
    s_{i,t}   = sigmoid(u_t^T e_i)                                   (eq. 15; softmax for DeepSeek-V2)
    g'_{i,t}  = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K_r) else 0       (eq. 16)
    g_{i,t}   = g'_{i,t} / sum_j g'_{j,t}                                          (eq. 13, norm_topk_prob)
              * routed_scaling_factor                                   (the published reference's gate scale)
The bias b_i only chooses experts; gates come from the unbiased s. Node-limited routing (section 2.1.2):
experts form n_group groups; a group's score is the sum of its top `group_score_topk` biased affinities (the
published reference uses 2); the token may only use its `topk_group` best groups. Other groups are masked with
-inf (Hugging Face's older port used 0.0, which picks masked experts when biased scores are negative).

Auxiliary-loss-free balancing (section 2.1.2): after each global batch, b_i += gamma * sign(mean load - load_i),
with the loads summed over every rank that saw tokens of this pipeline stage, so the bias stays identical
everywhere (`update_expert_bias`, `apply_expert_bias_update`). That group (tensor x data x context parallel of the
stage: megatron-core's `tp_dp_cp`) is each Router's `balance_group`, given by the layer from its pg_collection.

Complementary sequence-wise balance loss (eqs. 17-20), attached to the graph by `AuxLossScaler` so no plumbing
through forward is needed; its value per layer is recorded for logging.

Everything routing-related runs in float32 whatever the model dtype (the paper keeps gating in high precision).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.config import MoEConfig
from megatron_dsv3.fused_wgrad import NOT_NEEDED, grad_need

__all__ = [
    "Router", "route", "group_limited_topk", "update_expert_bias", "apply_expert_bias_update",
    "sequence_balance_loss", "batch_balance_loss", "AuxLossScaler", "set_aux_loss_scale", "placement_groups",
    "max_violation", "routers_of",
]


# ---- pure functions ---------------------------------------------------------------------------------------------

def group_limited_topk(scores_for_choice: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       group_score_topk: int = 2, expert_order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices [T, k] of the chosen experts: top-k of the biased scores within each token's best groups.

    scores_for_choice: [T, E] (affinity + bias). Groups are contiguous blocks of E/n_group experts, or, with
    `expert_order` [E] (a permutation listing the experts group by group), the blocks of that order.
    """
    T, E = scores_for_choice.shape
    if topk_group >= n_group:                                                                # no group limit
        return torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    s = scores_for_choice if expert_order is None else scores_for_choice[:, expert_order]
    grouped = s.view(T, n_group, E // n_group)                                               # [T, G, E/G]
    group_scores = grouped.topk(min(group_score_topk, E // n_group), dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]              # [T, M]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)     # [T, G]
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)              # [T, E] (-inf, not 0)
    idx = torch.topk(masked, k=top_k, dim=-1, sorted=False)[1]                               # [T, k] in `s` order
    return idx if expert_order is None else expert_order[idx]


def route(logits: torch.Tensor, moe: MoEConfig, expert_bias: Optional[torch.Tensor] = None,
          expert_order: Optional[torch.Tensor] = None, n_group: Optional[int] = None
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (topk_idx [T, k] int64, gates [T, k] float32, scores [T, E] float32)."""
    scores = logits.sigmoid() if moe.score_function == "sigmoid" else logits.softmax(dim=-1)    # eq. 15
    choice = scores.detach() if expert_bias is None else scores.detach() + expert_bias           # eq. 16: b only chooses
    topk_idx = group_limited_topk(choice, moe.top_k, n_group or moe.n_group, moe.topk_group, moe.group_score_topk,
                                  expert_order)
    gates = scores.gather(1, topk_idx)                                                           # [T, k] unbiased
    if moe.norm_topk_prob:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)                                # eq. 13
    return topk_idx, gates * moe.routed_scaling_factor, scores


class _Float32Logits(torch.autograd.Function):
    """x W^T computed in float32 from a bf16/fp16 x, keeping x itself (the MoE block's input, kept anyway) rather
    than its float32 copy for backward: the upcast is exact, so forward and both gradients are bit-identical to
    F.linear(x.float(), W.float()), and the layer keeps 4h bytes per token less (28 KB at h = 7168)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())                                                # [T, E] fp32

    @staticmethod
    def backward(ctx, dlogits):
        x, weight = ctx.saved_tensors
        # only what this pass uses (DualPipe's split backward: dx in its B pass, dW in its W pass)
        need_x, need_w = (grad_need(ctx, i) != NOT_NEEDED for i in (0, 1))
        dx = (dlogits @ weight.float()).to(x.dtype) if need_x else None                            # [T, h]
        dw = (dlogits.t() @ x.float()).to(weight.dtype) if need_w else None                        # [E, h]
        return dx, dw


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[T, h] x [E, h] -> float32 [T, E] router logits (section 3.3: gating in high precision).

    Measured and removed (H200, 2026-11-30): the gate's GEMMs on bf16 operands with float32 accumulation and dlogits
    in two bf16 halves (no float32 copy of x) ran DeepSeekMoE alone in 17.77 vs 17.78 ms, the same peak memory."""
    if x.dtype in (torch.float32, torch.float64):
        return F.linear(x.float(), weight.float())
    return _Float32Logits.apply(x, weight)


def tokens_per_expert(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] expert ids -> [E] int64 counts. A scatter-add rather than torch.bincount: CUDA's bincount reads the
    largest id back to the host (a sync per MoE layer, twice with the dispatch plan); integer sums are exact, so the
    atomics are deterministic."""
    flat = topk_idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def update_expert_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """b_i + rate * sign(mean load - load_i): overloaded experts get less attractive, underloaded more."""
    load = tokens_per_expert.to(torch.float64)
    return (bias.to(torch.float64) + rate * torch.sign(load.mean() - load)).to(bias.dtype)


def max_violation(tokens_per_expert: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load (the paper's balance metric, Figure/Table on balancing)."""
    load = tokens_per_expert.to(torch.float64)
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def _balance_terms(scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, top_k: int,
                   counts: Optional[torch.Tensor] = None, tokens: Optional[int] = None):
    """sum_i f_i P_i for one token set: scores [T, E], topk_idx [T, k] (eqs. 18-20)."""
    T = scores.shape[0]
    if counts is None:
        counts = tokens_per_expert(topk_idx, num_experts)
    tokens = T if tokens is None else tokens
    f = counts.to(scores.dtype) * (num_experts / (top_k * tokens))                               # eq. 18
    s_norm = scores / scores.sum(dim=-1, keepdim=True)                                           # eq. 19
    P = s_norm.sum(dim=0) / tokens                                                               # eq. 20
    return (f * P).sum()


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, seq_len: int, num_seqs: int,
                          num_experts: int, top_k: int, alpha: float, token_layout: str = "sb",
                          seq_group=None) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence (eq. 17), averaged over sequences.

    scores [T, E] float32 with T = seq_len * num_seqs, in megatron's [s, b] order (token_layout "sb") or [b, s]
    ("bs"). `seq_group`: when each rank holds only a part of every sequence (sequence or context parallel), the
    counts are summed over that group and P is divided by the full length, so the losses of the group's ranks add
    up to the loss of the whole sequences (each rank's gradient is then exact).
    """
    E = num_experts
    if token_layout == "sb":
        s3 = scores.view(seq_len, num_seqs, E).transpose(0, 1)                                   # [b, s, E]
        i3 = topk_idx.view(seq_len, num_seqs, -1).transpose(0, 1)                                # [b, s, k]
    else:
        s3, i3 = scores.view(num_seqs, seq_len, E), topk_idx.view(num_seqs, seq_len, -1)
    counts = torch.zeros(num_seqs, E, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(1, i3.reshape(num_seqs, -1), torch.ones_like(i3.reshape(num_seqs, -1)))  # [b, E]
    length = seq_len
    if seq_group is not None and torch.distributed.get_world_size(seq_group) > 1:
        torch.distributed.all_reduce(counts, group=seq_group)
        length = seq_len * torch.distributed.get_world_size(seq_group)
    f = counts.to(scores.dtype) * (E / (top_k * length))                                         # [b, E] eq. 18
    s_norm = s3 / s3.sum(dim=-1, keepdim=True)                                                   # [b, s, E] eq. 19
    P = s_norm.sum(dim=1) / length                                                               # [b, E] eq. 20
    return alpha * (f * P).sum(dim=-1).mean()                                                    # eq. 17, mean over b


def batch_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, top_k: int,
                       alpha: float) -> torch.Tensor:
    """The same balance loss over every token of the micro-batch (one 'sequence')."""
    return alpha * _balance_terms(scores, topk_idx, num_experts, top_k)


def placement_groups(ep_global_ranks: List[int], num_experts: int, ranks_per_node: int) -> torch.Tensor:
    """Group id per expert [E] when a group is "the experts placed on one node".

    Expert g lives on EP rank g // (E / ep); that rank's node is global_rank // ranks_per_node. Node ids are
    renumbered 0..nodes-1 in order of first appearance.
    """
    ep = len(ep_global_ranks)
    per_rank = num_experts // ep
    nodes: Dict[int, int] = {}
    ids = [nodes.setdefault(r // ranks_per_node, len(nodes)) for r in ep_global_ranks]
    return torch.tensor([ids[g // per_rank] for g in range(num_experts)], dtype=torch.int64)


# ---- the auxiliary-loss autograd trick ---------------------------------------------------------------------------

class AuxLossScaler(torch.autograd.Function):
    """forward: return the activations unchanged; backward: also send d(scale * aux)/d(aux) = scale into aux.

    The scale is what the main loss is multiplied by before backward (1/num_microbatches, times the loss scale
    under fp16). When `set_aux_loss_scale` was never called, megatron-core's MoEAuxLossAutoScaler scale is used,
    which megatron-core's pipeline schedules set on every forward step (config.num_moe_experts is set), else 1.
    """
    scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, activations: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return activations

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss) * _current_aux_scale(aux_loss.device)


def _current_aux_scale(device) -> torch.Tensor:
    scale = AuxLossScaler.scale
    if scale is None:
        try:
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
            scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        except ImportError:
            scale = None
    if scale is None:
        return torch.ones((), device=device)
    return torch.as_tensor(scale, device=device).reshape(()).to(torch.float32)


def set_aux_loss_scale(scale) -> None:
    """Scale applied to the balance-loss gradient (call with the main loss's scale, e.g. 1/num_microbatches);
    None: follow megatron-core's MoEAuxLossAutoScaler."""
    AuxLossScaler.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).detach().clone()


# ---- the module -------------------------------------------------------------------------------------------------

class Router(MegatronModule):
    """Gate of one MoE layer.

    Parameters / buffers (state dict names):
        weight       [E, h] parameter in the model's params dtype (HF mlp.gate.weight, bf16 in the published
                            checkpoint); the affinities are computed in float32 from it, and the optimizer keeps
                            its float32 master copy as for every other weight
        expert_bias  [E]    float32 persistent buffer (HF mlp.gate.e_score_correction_bias); absent when
                            MoEConfig.expert_bias is False (DeepSeek-V2)
        tokens_per_expert [E] int64 non-persistent buffer: routed-token counts accumulated over the micro-batches
                            of a global batch by the layer (`record_tokens`); read and reset by
                            `apply_expert_bias_update`.
    expert_bias stays float32 when the model is cast to bf16/fp16 (see `_apply`): ±gamma steps of 1e-3 would
    vanish in bf16. (The weight follows the model dtype: megatron-core's distributed-optimizer checkpoints
    expect one parameter dtype per model.)
    """

    def __init__(self, config, moe: MoEConfig, expert_order: Optional[torch.Tensor] = None,
                 n_group: Optional[int] = None, balance_group=None):
        super().__init__(config=config)
        self.moe = moe
        self.layer_number: Optional[int] = None
        E, h = moe.num_experts, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else None
        self.weight = torch.nn.Parameter(torch.empty(E, h, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            config.init_method(self.weight)
        if getattr(config, "sequence_parallel", False):
            # each TP rank routes different tokens: megatron's finalize_model_grads all-reduces this grad over TP
            setattr(self.weight, "sequence_parallel", True)
        if moe.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64, device=device),
                             persistent=False)
        # node-limited routing by placement: experts listed group by group (None: contiguous groups)
        self.register_buffer("expert_order", expert_order, persistent=False)
        self.n_group = n_group or moe.n_group
        # set by DeepSeekMoE with TP > 1 and no sequence parallel (see layer.py): the gates' gradient is summed
        # over this group because each TP rank combines only its share of the tokens
        self.gate_grad_group = None
        self.seq_group = None  # ranks holding parts of the same sequences (SP/CP), for the balance loss
        # every rank that routes different tokens to the same experts: the stage's tensor x data x context parallel
        # group (pg_collection.tp_dp_cp). apply_expert_bias_update sums the load counts over it; None: not known
        self.balance_group = balance_group
        self._aux_sum: Optional[torch.Tensor] = None
        self._aux_calls = 0

    def _apply(self, fn, *args, **kwargs):
        """Keep expert_bias float32 under module.bfloat16()/.half() (Float16Module casts everything)."""
        keep = {n: t for n, t in (("expert_bias", self.expert_bias),) if t is not None}
        keep = {n: t.detach().clone() for n, t in keep.items()}
        out = super()._apply(fn, *args, **kwargs)
        for n, orig in keep.items():
            t = getattr(self, n)
            if t.dtype != torch.float32:
                t.data = orig.to(device=t.device, dtype=torch.float32)
        return out

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [s, b, h] -> (topk_idx [s*b, k] int64, gates [s*b, k] float32).

        The balance loss (when configured and training) rides on the gates through AuxLossScaler.
        """
        s, b, h = hidden_states.shape
        logits = float32_logits(hidden_states.reshape(s * b, h), self.weight)                     # [T, E] fp32
        gate_logits = logits
        if self.gate_grad_group is not None:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
            gate_logits = copy_to_tensor_model_parallel_region(logits, group=self.gate_grad_group)
        topk_idx, gates, _ = route(gate_logits, self.moe, self.expert_bias, self.expert_order, self.n_group)
        moe = self.moe
        if self.training and torch.is_grad_enabled() and moe.aux_loss_type != "none" and moe.seq_aux_loss_coeff > 0:
            # scores without the TP gate-gradient sum: every TP rank holds the whole loss already
            scores = logits.sigmoid() if moe.score_function == "sigmoid" else logits.softmax(dim=-1)
            if moe.aux_loss_type == "sequence":
                aux = sequence_balance_loss(scores, topk_idx, s, b, moe.num_experts, moe.top_k,
                                            moe.seq_aux_loss_coeff, seq_group=self.seq_group)
            else:  # batch-wise: every token of the micro-batch as one set (= batch_balance_loss), SP/CP-aware
                aux = sequence_balance_loss(scores, topk_idx, s * b, 1, moe.num_experts, moe.top_k,
                                            moe.seq_aux_loss_coeff, seq_group=self.seq_group)
            self._record_aux(aux.detach())
            gates = AuxLossScaler.apply(gates, aux)
        return topk_idx, gates

    def _record_aux(self, value: torch.Tensor) -> None:
        # with sequence/context parallel each rank holds a part of the loss: scale so that the mean over the
        # stage's ranks (what apply_expert_bias_update reports) is the loss of whole sequences
        if self.seq_group is not None:
            value = value * torch.distributed.get_world_size(self.seq_group)
        self._aux_sum = value if self._aux_sum is None else self._aux_sum + value
        self._aux_calls += 1

    @torch.no_grad()
    def record_tokens(self, topk_idx: torch.Tensor) -> None:
        """Add this rank's routed-token counts (topk_idx [T, k]) to tokens_per_expert."""
        self.tokens_per_expert += tokens_per_expert(topk_idx, self.moe.num_experts)


def routers_of(model_chunks) -> List[Tuple[str, Router]]:
    """Every Router in the model chunks, with a name (chunk prefix when there are several chunks)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    out = []
    for c, chunk in enumerate(chunks):
        for name, m in chunk.named_modules():
            if isinstance(m, Router):
                out.append((f"chunk{c}.{name}" if len(chunks) > 1 else name, m))
    return out


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _reduce_groups(routers, group) -> List[Tuple[object, List[int]]]:
    """[(group, indices of the routers reduced over it)] in order of first appearance (the same on every rank of
    a stage: they hold the same modules). `group` given: every router uses it."""
    if group is not None:
        return [(group, list(range(len(routers))))]
    if _distributed_world() > 1:
        missing = [name for name, r in routers if r.balance_group is None]
        if missing:
            raise ValueError(
                f"apply_expert_bias_update: no process group to sum the expert loads over for router(s) "
                f"{', '.join(repr(n) for n in missing[:3])}{' ...' if len(missing) > 3 else ''}: build DeepSeekMoE "
                f"with a pg_collection that has tp_dp_cp (the pipeline stage's tensor x data x context parallel "
                f"group, as ProcessGroupCollection.use_mpu_process_groups() gives), or pass group=")
    out: Dict[int, Tuple[object, List[int]]] = {}
    for i, (_, r) in enumerate(routers):
        out.setdefault(id(r.balance_group), (r.balance_group, []))[1].append(i)
    return list(out.values())


@torch.no_grad()
def apply_expert_bias_update(model_chunks, rate: float, group=None) -> Dict[str, dict]:
    """The once-per-global-batch hook (call after the optimizer step, or as an optimizer pre-step hook).

    Sums every router's `tokens_per_expert` (and recorded balance losses) over its `balance_group` (the pipeline
    stage's tensor x data x context parallel group, pg_collection.tp_dp_cp of the model's layers) with one
    all-reduce per distinct group (one in all for a model built with one pg_collection); an explicit `group`
    is used for every router instead. Under torch.distributed with more than one rank, a router without a
    group (and no `group`) is a ValueError: never WORLD, which would mix the pipeline stages' counts.
    It updates each router's expert_bias with `update_expert_bias` (identically on every rank),
    resets the counts, and returns per-router metrics:
        {name: {"layer_number", "tokens_per_expert" [E] float64, "max_vio", "bias_min", "bias_max",
                "bias_spread", "aux_loss" (mean over micro-batches and ranks, or None)}}
    `rate` is gamma at this point of training: MoEConfig.bias_rate_at(tokens_seen).

    From a Megatron-LM training script (megatron/training/training.py, `train_step`), right after
    `update_successful, grad_norm, num_zeros = optimizer.step()`:

        if update_successful:
            rate = dsv3_config.moe.bias_rate_at(args.consumed_train_samples * args.seq_length)
            moe_metrics = apply_expert_bias_update(model, rate)   # model: the list of model chunks

    Every rank of a pipeline stage must call it (it is a collective); stages run it independently. Counting
    happens in training-mode, grad-enabled forwards only (so eval passes and the no-grad first pass of activation
    recompute are not counted).
    """
    routers = routers_of(model_chunks)
    if not routers:
        return {}
    plan = _reduce_groups(routers, group)                          # raises before any collective
    device = routers[0][1].tokens_per_expert.device
    flat: List[Optional[torch.Tensor]] = [None] * len(routers)  # per router: [E + 2] float64
    for g, members in plan:
        parts = []
        for i in members:
            r = routers[i][1]
            aux = (r._aux_sum.to(torch.float64).reshape(1) if r._aux_sum is not None
                   else torch.zeros(1, dtype=torch.float64, device=device))
            parts += [r.tokens_per_expert.to(torch.float64), aux.to(device),
                      torch.tensor([float(r._aux_calls)], dtype=torch.float64, device=device)]
        buf = torch.cat([p.to(device) for p in parts])             # float64: exact integer counts up to 2^53
        if g is not None and _distributed_world() > 1 and torch.distributed.get_world_size(g) > 1:
            torch.distributed.all_reduce(buf, group=g)
        off = 0
        for i in members:
            E = routers[i][1].moe.num_experts
            flat[i], off = buf[off:off + E + 2], off + E + 2
    metrics = {}
    for (name, r), reduced in zip(routers, flat):
        E = r.moe.num_experts
        counts, aux_sum, calls = reduced[:E], reduced[E], reduced[E + 1]
        if r.expert_bias is not None and rate != 0:
            r.expert_bias.copy_(update_expert_bias(r.expert_bias, counts, rate))
        r.tokens_per_expert.zero_()
        r._aux_sum, r._aux_calls = None, 0
        b = r.expert_bias
        metrics[name] = {
            "layer_number": r.layer_number,
            "tokens_per_expert": counts.cpu(),
            "max_vio": max_violation(counts),
            "bias_min": float(b.min()) if b is not None else 0.0,
            "bias_max": float(b.max()) if b is not None else 0.0,
            "bias_spread": float(b.max() - b.min()) if b is not None else 0.0,
            "aux_loss": float(aux_sum / calls) if calls > 0 else None,
        }
    return metrics
