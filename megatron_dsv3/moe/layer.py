"""DeepSeekMoE layer (DeepSeek-V3 section 2.1.2, eq. 12 without the residual):

    h'_t = sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)

megatron-core's TransformerLayer adds the residual u_t. The N_s shared experts are one megatron-core MLP of width
N_s * expert_ffn_hidden_size (tensor-parallel like the dense MLP); the routed experts are our GroupedExperts,
split over the expert-parallel group (ETP = 1), reached through the seams of dispatch.py (route -> plan ->
dispatch -> experts -> combine, methods of this class). No token dropping.

Tensor parallelism without sequence parallelism: every TP rank holds all tokens. Each rank routes all of them
(identical routing, identical balance loss), but sends only its 1/tp share of the tokens to the experts; the
shares are summed back with an all-reduce over TP (forward all-reduce, backward identity). The inputs of the
expert path and the gate logits go through megatron's copy_to_tensor_model_parallel_region (backward
all-reduce), so the gradients of the input and of the router weight are complete and identical on every TP
rank. Each token is computed by its experts exactly once, so the expert gradients are exact too. Only the
rank's own share is counted into the router's tokens_per_expert; the bias update sums counts over TP as well.
With sequence parallelism the TP ranks hold different tokens and nothing special is needed.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3.compat import get_process_group_collection
from megatron_dsv3.config import MoEConfig
from megatron_dsv3.moe.dispatch import DispatchPlan, Rows, combine, dispatch, plan_dispatch
from megatron_dsv3.moe.router import placement_groups

__all__ = ["DeepSeekMoE", "DeepSeekMoESubmodules", "resolve_ranks_per_node"]


@dataclass
class DeepSeekMoESubmodules:
    router: Union[ModuleSpec, type] = None            # Router
    experts: Union[ModuleSpec, type] = None           # GroupedExperts
    shared_experts: Union[ModuleSpec, type, None] = None  # megatron MLP spec; None when num_shared_experts == 0


def _size(group) -> int:
    return torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1


def _rank(group) -> int:
    return torch.distributed.get_rank(group) if group is not None and torch.distributed.is_initialized() else 0


def resolve_ranks_per_node(ranks_per_node: Optional[int] = None, environ=None) -> int:
    """Ranks per node for node-limited routing by placement: the explicit value, else LOCAL_WORLD_SIZE when the
    launcher (torchrun) set it. Never a guess: the world size would silently put every rank on one node."""
    if ranks_per_node is None:
        env = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE")
        if not env:
            raise ValueError("MoEConfig.node_limited_by_placement needs the number of ranks per node: pass "
                             "ranks_per_node to DeepSeekMoE (spec params), or launch with torchrun, which sets "
                             "LOCAL_WORLD_SIZE")
        try:
            ranks_per_node = int(env)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE must be an integer (ranks per node), got {env!r}") from None
    if int(ranks_per_node) < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    return int(ranks_per_node)


class DeepSeekMoE(MegatronModule):
    """forward(hidden_states [s, b, h]) -> (out [s, b, h], None). Submodule names: router, experts, shared_experts.

    Process groups all come from `pg_collection` (megatron-core's parallel_state groups when None): tp, ep, cp /
    tp_cp (balance loss), tp_dp_cp (the router's balance group for the bias update), expt_tp / expt_dp (the experts'
    checkpoint replicas). `ranks_per_node`: for MoEConfig.node_limited_by_placement (see resolve_ranks_per_node).
    """

    def __init__(self, config, submodules: DeepSeekMoESubmodules, moe: MoEConfig, layer_number: Optional[int] = None,
                 pg_collection=None, ranks_per_node: Optional[int] = None, model_pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.moe = moe
        # pg_collection: what megatron-core's TransformerLayer passes (0.19: the block's; 0.16: nothing);
        # model_pg_collection: the model's, carried by our spec (the same groups where both are given)
        pgs = get_process_group_collection(pg_collection if pg_collection is not None else model_pg_collection)
        self.tp_group, self.ep_group = pgs.tp, pgs.ep
        tp, ep = _size(self.tp_group), _size(self.ep_group)
        if moe.num_experts % ep:
            raise ValueError(f"MoEConfig.num_experts ({moe.num_experts}) must be divisible by the expert-parallel "
                             f"size ({ep})")
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        # TP without SP: split the routed work over the TP ranks (module docstring)
        self.tp_split = tp > 1 and not self.sequence_parallel

        expert_order, n_group = None, None
        if moe.node_limited_by_placement and ep > 1:
            groups = placement_groups(torch.distributed.get_process_group_ranks(self.ep_group), moe.num_experts,
                                      resolve_ranks_per_node(ranks_per_node))
            n_group = int(groups.max()) + 1     # nodes the EP group spans; topk_group >= n_group: no limit
            expert_order = torch.argsort(groups, stable=True)
        # the load counts of the bias update are summed over the stage's TP x DP x CP ranks (router.py)
        self.router = build_module(submodules.router, config=config, moe=moe, expert_order=expert_order,
                                   n_group=n_group, balance_group=getattr(pgs, "tp_dp_cp", None))
        if self.tp_split:
            self.router.gate_grad_group = self.tp_group
        cp_group = getattr(pgs, "cp", None)
        seq_group = getattr(pgs, "tp_cp", None) if self.sequence_parallel else cp_group
        self.router.seq_group = seq_group if _size(seq_group) > 1 else None
        self.experts = build_module(submodules.experts, config=config,
                                    num_local_experts=moe.num_experts // ep,
                                    ffn_hidden_size=moe.expert_ffn_hidden_size, ep_rank=_rank(self.ep_group),
                                    ep_size=ep, pg_collection=pgs)
        self.shared_experts = None
        if submodules.shared_experts is not None and moe.num_shared_experts > 0:
            width = moe.num_shared_experts * moe.expert_ffn_hidden_size
            # megatron-core 0.16.1's MLP sizes linear_fc2's input from config.ffn_hidden_size, not from its
            # ffn_hidden_size argument: give it a config copy with the shared width
            shared_config = copy.copy(config)
            shared_config.ffn_hidden_size = width
            self.shared_experts = build_module(submodules.shared_experts, config=shared_config,
                                               ffn_hidden_size=width, tp_group=self.tp_group)
        self.set_layer_number(layer_number)

    def set_layer_number(self, layer_number: Optional[int]) -> None:
        """Called by megatron's TransformerLayer with its (global, 1-based) layer number; used to name metrics."""
        self.layer_number = layer_number
        self.router.layer_number = layer_number

    # ---- the seams (route -> plan -> dispatch -> experts -> combine; shared experts beside) -------------------------
    # Each step takes and returns plain tensors (or a Pending with async_op=True), so a schedule can interleave the
    # steps of two micro-batches (DualPipe, Figure 4) and a precision can replace the expert GEMMs
    # (GroupedExperts.expert_mlp). forward() runs them in order, the shared experts while the dispatch is in flight.
    def route(self, hidden_states: torch.Tensor):
        """[s, b, h] -> (x [T', h], topk_idx [T', k], gates [T', k] float32): the tokens this rank sends to the
        experts (under TP without SP its 1/tp share of the tokens, module docstring); counted for the bias update."""
        s, b, h = hidden_states.shape
        topk_idx, gates = self.router(hidden_states)                       # [T, k] int64, [T, k] fp32
        x = hidden_states.reshape(s * b, h)                                 # [T, h]
        if self.tp_split:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
            lo, hi = self._tp_share(s * b)
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)[lo:hi]
            topk_idx, gates = topk_idx[lo:hi], gates[lo:hi]
        if self.training and torch.is_grad_enabled():
            # grad-enabled only: under activation recompute the first (no-grad) pass is not counted twice
            self.router.record_tokens(topk_idx)
        return x, topk_idx, gates

    def plan(self, topk_idx: torch.Tensor) -> DispatchPlan:
        """Dispatch metadata for these choices (the layer's one host sync under EP: the split sizes)."""
        return plan_dispatch(topk_idx, self.moe.num_experts, self.ep_group)

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, async_op: bool = False):
        """[T', h], gates [T', k] -> Rows(x [N, h], gates [N]): this rank's expert input rows and their gates (a
        Pending with async_op)."""
        return dispatch(x, plan, gates, async_op=async_op)

    def compute_experts(self, rows: Rows, plan: DispatchPlan) -> torch.Tensor:
        """Rows (or the [x, gates] list the overlap executor makes of it) -> g_{t,j} FFN_{t,j}(u_t) [N, h]: the
        routed experts of this rank (GroupedExperts.expert_mlp), each row scaled by its gate."""
        x, gates = rows
        return self.experts(x, plan.local_counts, gates)

    def combine(self, y_rows: torch.Tensor, plan: DispatchPlan, async_op: bool = False):
        """[N, h] gate-scaled -> sum_k g_{t,k} FFN_{t,k}(u_t) for this rank's rows [T', h] (a Pending with
        async_op): an unweighted sum, its backward a gather."""
        return combine(y_rows, plan, async_op=async_op)

    def shared(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """[s, b, h] -> the shared experts' output [s, b, h] (None without shared experts)."""
        if self.shared_experts is None:
            return None
        out, bias = self.shared_experts(hidden_states)
        return out if bias is None else out + bias

    def finish(self, routed: torch.Tensor, shared: Optional[torch.Tensor], shape) -> torch.Tensor:
        """Routed rows [T', h] (+ shared [s, b, h]) -> the layer output [s, b, h] (TP split: summed over TP)."""
        s, b, h = shape
        if self.tp_split:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
            lo, hi = self._tp_share(s * b)
            full = routed.new_zeros(s * b, h)
            full = torch.cat([full[:lo], routed, full[hi:]], dim=0)
            routed = reduce_from_tensor_model_parallel_region(full, group=self.tp_group)
        out = routed.view(s, b, h)
        return out if shared is None else out + shared

    def _tp_share(self, T: int):
        tp, r = _size(self.tp_group), _rank(self.tp_group)
        return T * r // tp, T * (r + 1) // tp

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **kwargs):
        """hidden_states [s, b, h] -> (routed + shared output [s, b, h], None). padding_mask is not used:
        padded positions are routed like any token (DeepSeek-V3 packs documents, no padding)."""
        x, topk_idx, gates = self.route(hidden_states)
        plan = self.plan(topk_idx)
        sent = self.dispatch(x, plan, gates, async_op=True)
        shared = self.shared(hidden_states)                # computed while the dispatch all-to-all is in flight
        y = self.compute_experts(sent.wait(), plan)
        routed = self.combine(y, plan)
        return self.finish(routed, shared, hidden_states.shape), None
