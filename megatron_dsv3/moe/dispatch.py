"""Expert-parallel token dispatch as seams: plan -> dispatch -> experts -> combine (DeepSeek-V3 sections 2.1.2, 3.2.1).

    plan  = plan_dispatch(topk_idx, E, ep_group)   sort order, per-expert counts, all-to-all split sizes: the ONE
                                                   host sync of a layer, taken right after routing
    x_in  = dispatch(x, plan)                      permute [T, h] into one row per (token, choice) sorted by global
                                                   expert, all-to-all -> this rank's rows [N, h] by (local expert, src)
    y     = experts(x_in, plan.local_counts)       the expert GEMMs (GroupedExperts.expert_mlp: the FP8 hook)
    out   = combine(y, plan, gates)                all-to-all back, unpermute, sum_k g_{t,k} y_{t,k} -> [T, h]

`dispatch` and `combine` with async_op=True return a `Pending` whose wait() gives the tensor: the all-to-all runs
while the caller computes something else (the shared expert here; another micro-batch's chunk under DualPipe,
Figure 4). Their backward is asynchronous too: the reverse all-to-all starts when the gradient of wait()'s output
arrives and is waited for only when the gradient of the input is needed, so autograd runs whatever else is ready
in between. Nothing is dropped: every (token, chosen expert) pair is computed. Global expert g lives on EP rank
g // E_local. Device-agnostic: gloo on CPU (async work on gloo's threads), NCCL on GPU (its own stream).

Memory and speed (why the permutation and the combine are autograd Functions over kernels.py): the unpermuted
expert outputs are weighted and summed in one pass that saves only the expert output rows (activation dtype), the
gates and the inverse permutation, accumulating in float32 per token; the permutation's backward sums each token's
k row gradients the same way. No [T, k, h] float32 copy exists and no gradient is accumulated with atomics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_dsv3.moe.kernels import scatter_rows, sum_rows
from megatron_dsv3.moe.router import tokens_per_expert

__all__ = ["DispatchPlan", "Pending", "plan_dispatch", "dispatch", "combine", "all_to_all", "dispatch_combine",
           "combine_reference"]


def _ep_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


# ---- the plan: everything the two all-to-alls and the (un)permutation need, computed once -----------------------
@dataclass
class DispatchPlan:
    T: int                         # tokens of this rank
    k: int                         # choices per token
    num_experts: int               # E (global)
    ep: int                        # EP size
    group: object                  # EP process group (None: EP = 1)
    order: torch.Tensor            # [T*k] rows of topk_idx.view(-1) sorted by global expert (stable)
    token_of_row: torch.Tensor     # [T*k] token of each sorted row (order // k)
    pos: torch.Tensor              # [T*k] sorted row of choice (t, j) at t*k + j: the inverse of order
    send_splits: List[int]         # rows sent to each EP rank (host)
    recv_splits: List[int]         # rows received from each EP rank (host)
    local_counts: torch.Tensor     # [E_local] rows per local expert after the dispatch
    regroup: Optional[torch.Tensor]  # [N] (src rank, local expert) order -> (local expert, src rank); None at EP = 1


def plan_dispatch(topk_idx: torch.Tensor, num_experts: int, ep_group=None) -> DispatchPlan:
    """topk_idx [T, k] (global expert ids) -> DispatchPlan. Under EP the per-expert counts are exchanged with one
    small all-to-all and the split sizes fetched to the host here (the layer's only sync)."""
    T, k = topk_idx.shape
    ep = _ep_size(ep_group)
    E_local = num_experts // ep
    flat = topk_idx.reshape(-1)                                                       # [T*k]
    order = torch.argsort(flat, stable=True)                                          # [T*k]
    counts = tokens_per_expert(topk_idx, num_experts)                                # [E], no host sync
    pos = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    if ep == 1:
        return DispatchPlan(T, k, num_experts, 1, None, order, order // k, pos, [T * k], [T * k], counts, None)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=ep_group)                       # [ep * E_local]
    recv_counts = recv_counts.view(ep, E_local)
    splits = torch.stack([counts.view(ep, E_local).sum(1), recv_counts.sum(1)]).tolist()   # one host sync
    local_expert = torch.arange(E_local, device=flat.device).repeat(ep)               # (src, expert) blocks
    n = int(sum(splits[1]))
    rows_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1), output_size=n)
    regroup = torch.argsort(rows_expert, stable=True)                                 # [N]
    return DispatchPlan(T, k, num_experts, ep, ep_group, order, order // k, pos, splits[0], splits[1],
                        recv_counts.sum(0), regroup)


# ---- asynchronous, differentiable all-to-all ---------------------------------------------------------------------
class _Comm:
    """State shared by the start and wait nodes of one all-to-all (forward and backward)."""

    def __init__(self, out_splits: List[int], in_splits: List[int], group):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = None          # forward all-to-all in flight
        self.send = None          # its input, kept alive until it completes
        self.bwork = None         # backward (reverse) all-to-all in flight
        self.bgrad = None         # its output: the gradient of the start node's input
        self.bsend = None         # kept alive until bwork completes


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: _Comm) -> torch.Tensor:
        out = x.new_empty((sum(comm.out_splits),) + tuple(x.shape[1:]))
        comm.send = x.contiguous()
        comm.work = dist.all_to_all_single(out, comm.send, comm.out_splits, comm.in_splits, group=comm.group,
                                           async_op=True)
        ctx.comm = comm
        return out

    @staticmethod
    def backward(ctx, _unused_grad):
        comm = ctx.comm
        comm.bwork.wait()
        grad, comm.bgrad, comm.bsend, comm.bwork = comm.bgrad, None, None, None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, comm: _Comm) -> torch.Tensor:
        comm.work.wait()
        comm.work = comm.send = None
        ctx.comm = comm
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm = ctx.comm
        comm.bsend = grad.contiguous()
        comm.bgrad = grad.new_empty((sum(comm.in_splits),) + tuple(grad.shape[1:]))
        comm.bwork = dist.all_to_all_single(comm.bgrad, comm.bsend, comm.in_splits, comm.out_splits,
                                            group=comm.group, async_op=True)
        return grad, None       # a placeholder for _Start, which returns the real gradient after bwork


class Pending:
    """An operation in flight; wait() returns its (differentiable) result, once."""

    def __init__(self, tensor: torch.Tensor, comm: Optional[_Comm] = None, then=None):
        self._tensor, self._comm, self._then = tensor, comm, then

    def wait(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError("Pending.wait() called twice")
        t = _Wait.apply(self._tensor, self._comm) if self._comm is not None else self._tensor
        self._tensor = None
        return self._then(t) if self._then is not None else t

    def cut(self):
        """Cut the autograd graph between posting and waiting, for a schedule that runs the backward of the two
        sides at different times (pipeline/overlap.py): returns (in_flight, leaf). in_flight is the tensor the
        operation writes, the end of the graph up to the post; wait() continues from leaf, a detached copy of it
        (same storage). A backward of what follows wait() posts the reverse all-to-all and leaves a placeholder in
        leaf.grad; `torch.autograd.backward(in_flight, leaf.grad)` later waits for it and goes on to the input."""
        if self._tensor is None:
            raise RuntimeError("Pending.cut() after wait()")
        in_flight = self._tensor
        self._tensor = in_flight.detach().requires_grad_(in_flight.requires_grad)
        return in_flight, self._tensor


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, async_op: bool = False,
               then=None):
    """Send x[rows of in_splits[r]] to rank r, receive out_splits[r] rows from rank r (differentiable); `then`
    is applied to the received tensor by wait()."""
    comm = _Comm(list(out_splits), list(in_splits), group)
    p = Pending(_Start.apply(x, comm), comm, then)
    return p if async_op else p.wait()


# ---- the two seams -----------------------------------------------------------------------------------------------
def dispatch(x: torch.Tensor, plan: DispatchPlan, async_op: bool = False):
    """x [T, h] -> this rank's expert input rows [N, h], sorted by local expert (then source rank)."""
    x_sorted = _Permute.apply(x, plan.token_of_row, plan.pos)                         # [T*k, h] by global expert
    if plan.ep == 1:
        return Pending(x_sorted) if async_op else x_sorted
    regroup = plan.regroup
    p = all_to_all(x_sorted, plan.recv_splits, plan.send_splits, plan.group, async_op=True,
                   then=lambda t: t.index_select(0, regroup))                        # (src, e) -> (e, src)
    return p if async_op else p.wait()


def combine(y: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, async_op: bool = False):
    """Expert outputs y [N, h] (dispatch's row order) -> sum_k gates[t, k] * y_{t,k}: [T, h] in y's dtype."""
    if plan.ep > 1:
        back = torch.empty_like(y).index_copy(0, plan.regroup, y)                   # (e, src) -> (src, e)
        p = all_to_all(back, plan.send_splits, plan.recv_splits, plan.group, async_op=True,
                       then=lambda t: _Combine.apply(t, gates, plan.pos))
        return p if async_op else p.wait()
    out = _Combine.apply(y, gates, plan.pos)
    return Pending(out) if async_op else out


class _Permute(torch.autograd.Function):
    """x [T, h] -> x[token_of_row] [T*k, h]; backward: each token's k row gradients summed in float32 (kernels.sum_rows:
    no atomics into a bf16 gradient)."""

    @staticmethod
    def forward(ctx, x, token_of_row, pos):
        ctx.save_for_backward(pos)
        ctx.T = x.shape[0]
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return sum_rows(grad, pos, ctx.T), None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j gates[t, j] * y_sorted[pos[t*k + j]] with float32 products and sums (kernels.sum_rows); saves
    y_sorted (activation dtype), the gates and pos only."""

    @staticmethod
    def forward(ctx, y_sorted, gates, pos):
        ctx.save_for_backward(y_sorted, gates, pos)
        return sum_rows(y_sorted, pos, gates.shape[0], gates)

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, gates, pos = ctx.saved_tensors
        grad_y, grad_gates = scatter_rows(grad_out, y_sorted, pos, gates)
        return grad_y, grad_gates.to(gates.dtype), None


def combine_reference(y_sorted: torch.Tensor, gates: torch.Tensor, order: torch.Tensor, T: int) -> torch.Tensor:
    """Plain torch: unpermute to [T, k, h], weight in float32, sum over k."""
    k = gates.shape[1]
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(T, k, -1)     # [T, k, h]
    acc_dtype = torch.promote_types(y_sorted.dtype, torch.float32)
    return (y.to(acc_dtype) * gates.to(acc_dtype).unsqueeze(-1)).sum(dim=1).to(y_sorted.dtype)


def dispatch_combine(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor, experts, num_experts: int,
                     ep_group=None) -> torch.Tensor:
    """sum_k gates[t, k] * expert_{topk_idx[t, k]}(x[t]) for x [T, h], topk_idx [T, k], gates [T, k] float32: the
    four seams in a row. `experts(x_rows [N, h], counts [E_local])` computes this rank's experts."""
    plan = plan_dispatch(topk_idx, num_experts, ep_group)
    return combine(experts(dispatch(x, plan), plan.local_counts), plan, gates)
