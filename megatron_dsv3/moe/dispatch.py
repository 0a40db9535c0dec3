"""Expert-parallel token dispatch as seams: plan -> dispatch -> experts -> combine (DeepSeek-V3 sections 2.1.2, 3.2.1).

    plan  = plan_dispatch(topk_idx, E, ep_group)   sort order, per-expert counts, all-to-all split sizes: the ONE
                                                   host sync of a layer, taken right after routing
    rows  = dispatch(x, plan, gates)               permute [T, h] into one row per (token, choice) sorted by global
                                                   expert, all-to-all -> this rank's Rows(x [N, h], gates [N]) by
                                                   (local expert, src); each row's gate g_{t,j} travels with it
    y     = experts(rows.x, counts, rows.gates)    g_{t,j} FFN_{t,j}(x_t): the gate scales the SwiGLU output before
                                                   the down-projection (GroupedExperts.expert_mlp: the FP8 hook)
    out   = combine(y, plan)                       all-to-all back, unpermute, sum_j y_{t,j} -> [T, h]

Why the gates go with the tokens: sum_j g_j (a_j W2) = sum_j (g_j a_j) W2. Weighting after the down-projection
would keep the expert output rows y [T*k, h] for dg_{t,j} = <dout_t, y_{t,j}> (k h bytes-of-activation per token,
30% of the block at V3 width); scaled before it, dg_{t,j} = <d(g a)_{t,j}, a_{t,j}> comes from the SwiGLU backward,
which has h1 anyway, and the combine is an unweighted sum whose backward is a gather that keeps only the permutation.
The gates ([T*k] float32) ride the tokens' all-to-all as a side tensor of the same `Pending` (`_Comm.side`): posted
and waited with the rows, their gradient returned by the rows' reverse all-to-all, so `cut()` still sees one tensor
in flight.

`dispatch` and `combine` with async_op=True return a `Pending` whose wait() gives the result: the all-to-all runs
while the caller computes something else (the shared expert here; another micro-batch's chunk under DualPipe,
Figure 4). Their backward is asynchronous too: the reverse all-to-all starts when the gradient of wait()'s output
arrives and is waited for only when the gradient of the input is needed, so autograd runs whatever else is ready
in between. Nothing is dropped: every (token, chosen expert) pair is computed. Global expert g lives on EP rank
g // E_local. Device-agnostic: gloo on CPU (async work on gloo's threads), NCCL on GPU (its own stream).

Memory and speed (why the permutation and the combine are autograd Functions over kernels.py): each direction is a
float32-accumulating row sum (kernels.sum_rows) one way and a gather the other, saving only the permutation. No
[T, k, h] float32 copy exists and no gradient is accumulated with atomics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv3.moe.kernels import sum_rows
from megatron_dsv3.moe.router import tokens_per_expert

__all__ = ["DispatchPlan", "Rows", "Pending", "plan_dispatch", "dispatch", "combine", "all_to_all",
           "dispatch_combine", "combine_reference"]


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
    """State shared by the start and wait nodes of one all-to-all (forward and backward). Side tensors (the rows'
    gates) are exchanged with the same splits, posted and waited with the main one, their gradients likewise."""

    def __init__(self, out_splits: List[int], in_splits: List[int], group):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = None          # forward all-to-all in flight
        self.send = None          # its input, kept alive until it completes
        self.side = []            # side tensors: (received, work, sent) in flight, then received after wait
        self.bwork = None         # backward (reverse) all-to-all in flight
        self.bgrad = None         # its output: the gradient of the start node's input
        self.bsend = None         # kept alive until bwork completes
        self.bside = []           # the side tensors' reverse all-to-alls: (gradient, work, sent)

    def _post(self, t: torch.Tensor, out_splits, in_splits):
        t = t.contiguous()
        out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        return out, dist.all_to_all_single(out, t, out_splits, in_splits, group=self.group, async_op=True), t

    def post_side(self, side: Sequence[torch.Tensor]) -> None:
        self.side = [self._post(t, self.out_splits, self.in_splits) for t in side]

    def wait_side(self) -> List[torch.Tensor]:
        for _, work, _ in self.side:
            work.wait()
        got, self.side = [out for out, _, _ in self.side], []
        return got

    def post_side_grads(self, grads: Sequence[torch.Tensor]) -> None:
        self.bside = [self._post(g, self.in_splits, self.out_splits) for g in grads]

    def wait_side_grads(self) -> List[torch.Tensor]:
        for _, work, _ in self.bside:
            work.wait()
        got, self.bside = [out for out, _, _ in self.bside], []
        return got


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: _Comm, *side: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((sum(comm.out_splits),) + tuple(x.shape[1:]))
        comm.send = x.contiguous()
        comm.work = dist.all_to_all_single(out, comm.send, comm.out_splits, comm.in_splits, group=comm.group,
                                           async_op=True)
        comm.post_side(side)
        ctx.comm = comm
        return out

    @staticmethod
    def backward(ctx, _unused_grad):
        comm = ctx.comm
        comm.bwork.wait()
        grad, comm.bgrad, comm.bsend, comm.bwork = comm.bgrad, None, None, None
        return (grad, None, *comm.wait_side_grads())


class _Wait(torch.autograd.Function):
    """-> the received tensor, or (it, *received side tensors) when side tensors were posted."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, comm: _Comm):
        comm.work.wait()
        comm.work = comm.send = None
        side = comm.wait_side()
        ctx.comm = comm
        return (out, *side) if side else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *side_grads: torch.Tensor):
        comm = ctx.comm
        comm.bsend = grad.contiguous()
        comm.bgrad = grad.new_empty((sum(comm.in_splits),) + tuple(grad.shape[1:]))
        comm.bwork = dist.all_to_all_single(comm.bgrad, comm.bsend, comm.in_splits, comm.out_splits,
                                            group=comm.group, async_op=True)
        comm.post_side_grads(side_grads)
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
        if self._then is None:
            return t
        return self._then(*t) if isinstance(t, tuple) else self._then(t)

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
               then=None, side: Sequence[torch.Tensor] = ()):
    """Send x[rows of in_splits[r]] to rank r, receive out_splits[r] rows from rank r (differentiable); `then`
    is applied by wait() to the received tensor (and the received side tensors, exchanged the same way: wait()
    then gives a tuple, or then's result of all of them)."""
    comm = _Comm(list(out_splits), list(in_splits), group)
    p = Pending(_Start.apply(x, comm, *side), comm, then)
    return p if async_op else p.wait()


# ---- the two seams -----------------------------------------------------------------------------------------------
class Rows(NamedTuple):
    """This rank's expert input rows, sorted by local expert (then source rank), with their gates."""
    x: torch.Tensor          # [N, h]
    gates: torch.Tensor      # [N] float32: g_{t,j} of the (token, choice) each row is


def dispatch(x: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, async_op: bool = False):
    """x [T, h], gates [T, k] -> Rows: this rank's expert input rows [N, h] sorted by local expert (then source
    rank) and their gates [N]."""
    x_sorted = _Permute.apply(x, plan.token_of_row, plan.pos)                         # [T*k, h] by global expert
    g_sorted = gates.reshape(-1).index_select(0, plan.order)                           # [T*k]
    if plan.ep == 1:
        p = Pending(x_sorted, then=lambda t: Rows(t, g_sorted))        # cut() needs the rows in flight
        return p if async_op else p.wait()
    regroup = plan.regroup
    p = all_to_all(x_sorted, plan.recv_splits, plan.send_splits, plan.group, async_op=True, side=(g_sorted,),
                   then=lambda t, g: Rows(t.index_select(0, regroup), g.index_select(0, regroup)))
    return p if async_op else p.wait()                                                 # (src, e) -> (e, src) above


def combine(y: torch.Tensor, plan: DispatchPlan, async_op: bool = False):
    """Expert outputs y [N, h] (dispatch's row order, already gate-scaled) -> sum_j y_{t,j}: [T, h] in y's dtype."""
    if plan.ep > 1:
        back = torch.empty_like(y).index_copy(0, plan.regroup, y)                   # (e, src) -> (src, e)
        p = all_to_all(back, plan.send_splits, plan.recv_splits, plan.group, async_op=True,
                       then=lambda t: _Combine.apply(t, plan.token_of_row, plan.pos, plan.T))
        return p if async_op else p.wait()
    out = _Combine.apply(y, plan.token_of_row, plan.pos, plan.T)
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
    """out[t] = sum_j y_sorted[pos[t*k + j]], float32 sums (kernels.sum_rows); backward the gather
    dy = dout[token_of_row]: _Permute's transpose. Saves the permutation only."""

    @staticmethod
    def forward(ctx, y_sorted, token_of_row, pos, T: int):
        ctx.save_for_backward(token_of_row)
        return sum_rows(y_sorted, pos, T)

    @staticmethod
    def backward(ctx, grad_out):
        (token_of_row,) = ctx.saved_tensors
        return grad_out.index_select(0, token_of_row), None, None, None


def combine_reference(y_sorted: torch.Tensor, order: torch.Tensor, T: int) -> torch.Tensor:
    """Plain torch: unpermute to [T, k, h], sum over k in float32."""
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(T, order.numel() // max(T, 1), -1)
    acc_dtype = torch.promote_types(y_sorted.dtype, torch.float32)
    return y.to(acc_dtype).sum(dim=1).to(y_sorted.dtype)


def dispatch_combine(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor, experts, num_experts: int,
                     ep_group=None) -> torch.Tensor:
    """sum_k gates[t, k] * expert_{topk_idx[t, k]}(x[t]) for x [T, h], topk_idx [T, k], gates [T, k] float32: the
    four seams in a row. `experts(x_rows [N, h], counts [E_local], row_gates [N])` computes this rank's experts,
    each row's output scaled by its gate."""
    plan = plan_dispatch(topk_idx, num_experts, ep_group)
    rows = dispatch(x, plan, gates)
    return combine(experts(rows.x, plan.local_counts, rows.gates), plan)
