"""Expert-parallel token dispatch: permute by expert -> all-to-all -> local experts -> all-to-all back -> combine.

No token dropping: every (token, chosen expert) pair is computed. Global expert g lives on EP rank g // E_local.
Tokens sorted by global expert are already grouped by destination rank, so one all_to_all_single (with split
sizes exchanged first) sends them; the receiver re-sorts its tokens from (source rank, local expert) order to
(local expert, source rank) order for the grouped expert computation, and undoes that before sending back.
Device-agnostic (gloo on CPU, NCCL on GPU); the split sizes cost one small host sync per layer.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "dispatch_combine"]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Send x[rows of in_splits[r]] to rank r; receive out_splits[r] rows from rank r (differentiable)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def dispatch_combine(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor, experts, num_experts: int,
                     ep_group=None) -> torch.Tensor:
    """sum_k gates[t, k] * expert_{topk_idx[t, k]}(x[t]) for x [T, h], topk_idx [T, k], gates [T, k] float32.

    `experts(x_sorted [N, h], counts [E_local])` computes this rank's E_local = num_experts / ep experts.
    """
    T, h = x.shape
    k = topk_idx.shape[1]
    ep = dist.get_world_size(ep_group) if ep_group is not None and dist.is_initialized() else 1
    E_local = num_experts // ep

    # permute: one row per (token, choice), sorted by global expert (stable: token order within an expert)
    flat_expert = topk_idx.reshape(-1)                                                   # [T*k]
    order = torch.argsort(flat_expert, stable=True)                                      # [T*k]
    x_sorted = x[order // k]                                                             # [T*k, h]
    counts = torch.bincount(flat_expert, minlength=num_experts)                          # [E] per global expert

    if ep == 1:
        y_sorted = experts(x_sorted, counts)
    else:
        # how many rows each source rank sends to each of my local experts: [ep, E_local]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=ep_group)
        recv_counts = recv_counts.view(ep, E_local)
        send_splits = counts.view(ep, E_local).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, ep_group)               # [N, h] (src, expert)
        # (source rank, local expert) -> (local expert, source rank)
        local_expert = torch.repeat_interleave(
            torch.arange(E_local, device=x.device).repeat(ep), recv_counts.reshape(-1), output_size=x_recv.shape[0])
        regroup = torch.argsort(local_expert, stable=True)
        y_local = experts(x_recv[regroup], recv_counts.sum(dim=0))                      # [N, h]
        y_recv = torch.empty_like(y_local).index_copy(0, regroup, y_local)            # back to (src, expert)
        y_sorted = all_to_all(y_recv, send_splits, recv_splits, ep_group)               # [T*k, h]

    # unpermute and combine: gate multiplication in float32, then the activation dtype
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(T, k, h)          # [T, k, h]
    return (y.float() * gates.unsqueeze(-1)).sum(dim=1).to(x.dtype)                      # [T, h]
