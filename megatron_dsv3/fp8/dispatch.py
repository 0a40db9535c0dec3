"""Low-precision MoE dispatch (DeepSeek-V3 section 3.3.4): the tokens go to the routed experts in FP8.

    q, s    = quantize_tiles(x [T', h], pow2)      once per token, BEFORE the all-to-all: 1x128 tiles along h,
                                                   power-of-2 scales -- the FP8 experts' own Fprop recipe for x
    payload = [q | s] [T', h + 4 h/128] uint8      one buffer, rows permuted by global expert [T*k, h + 4 h/128]
    all-to-all(payload)                            h + 4 h/128 bytes a row against 2h for BF16: 0.516x at h = 7168
    FP8Rows(rows, q [N, h], s [N, h/128], gates)   received, regrouped by local expert: the experts' Fprop operand
                                                   and the rows' gates [N] float32 (moe/dispatch.py's side tensor:
                                                   a small all-to-all of their own, their gradient sent back)

The FP8 experts (fp8/experts.py) take q, s as they come (no second quantisation: quantising rows before or after
a row permutation gives the same bytes, so Fprop and Dgrad are bit-identical to the BF16-dispatch FP8 path).
Their Wgrad operand, x in 128x1 tiles per expert, is re-tiled from the dequantised FP8 copy (the BF16 rows never
reach this rank): the paper's dequantise-transpose-requantise of section 3.5.2, one more e4m3 rounding on dW1.
The combine stays BF16 (the paper keeps it so).

Autograd. The FP8 payload has no gradient. The rows' gradient [N, h] (BF16, as today) travels back through the
reverse all-to-all of moe/dispatch.py (`_Start` / `_Wait` backward, asynchronous as there). In forward it rides on
`FP8Rows.rows`, a ghost: an [N, h] tensor of x's dtype with stride 0 and one element of storage, never read; it
carries the graph x -> permute -> all-to-all -> regroup -> experts. So `Pending`, `async_op` and `Pending.cut()`
(pipeline/overlap.py) work unchanged: cut() cuts the ghost's graph, and the overlap executor's leaf detaching turns
the FP8Rows (a NamedTuple) into a list [rows leaf, q, s], which the FP8 experts accept as well.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_dsv3.fp8.quant import FP8
from megatron_dsv3.moe.dispatch import DispatchPlan, Pending, _Comm, _Start
from megatron_dsv3.moe.kernels import sum_rows
from megatron_dsv3.moe.layer import DeepSeekMoE

__all__ = ["FP8Rows", "FP8DispatchMoE", "fp8_dispatch", "payload_bytes_per_row"]


class FP8Rows(NamedTuple):
    """This rank's expert input rows as dispatched in FP8, sorted by local expert (then source rank)."""
    rows: torch.Tensor      # [N, h] ghost in x's dtype (stride 0): carries the rows' gradient, never read
    q: torch.Tensor         # [N, h] float8_e4m3fn
    scale: torch.Tensor     # [N, ceil(h/128)] float32, powers of 2
    gates: torch.Tensor     # [N] float32: each row's gate (the experts scale its SwiGLU output by it)


def payload_bytes_per_row(h: int) -> int:
    """Bytes one dispatched row costs: h e4m3 values and ceil(h/128) float32 scales (BF16: 2h)."""
    return h + 4 * (-(-h // 128))


def _ghost(like: torch.Tensor, n: int) -> torch.Tensor:
    return like.new_zeros(()).expand(n, like.shape[-1])                              # [n, h], stride (0, 0)


class _GhostPermute(torch.autograd.Function):
    """x [T, h] -> ghost [T*k, h] standing for x[token_of_row]; backward as moe/dispatch.py's _Permute: each token's
    k row gradients summed in float32 (kernels.sum_rows)."""

    @staticmethod
    def forward(ctx, x, pos):
        ctx.save_for_backward(pos)
        ctx.T = x.shape[0]
        return _ghost(x, pos.numel())

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return sum_rows(grad, pos, ctx.T), None


class _GhostRegroup(torch.autograd.Function):
    """ghost [N, h] in (src rank, local expert) order -> ghost in (local expert, src rank) order; backward puts the
    gradient rows back (regroup is a permutation: index_select's backward without the adds)."""

    @staticmethod
    def forward(ctx, ghost, regroup):
        ctx.save_for_backward(regroup)
        return _ghost(ghost, regroup.numel())

    @staticmethod
    def backward(ctx, grad):
        (regroup,) = ctx.saved_tensors
        return torch.empty_like(grad, memory_format=torch.contiguous_format).index_copy_(0, regroup, grad), None


class _PayloadStart(_Start):
    """_Start posting comm.payload (uint8 rows) instead of its input; returns a ghost of the received rows.
    Backward inherited: wait for the reverse all-to-all of the rows' gradient (posted by _Wait's backward)."""

    @staticmethod
    def forward(ctx, ghost: torch.Tensor, comm: _Comm, *side: torch.Tensor) -> torch.Tensor:
        payload, comm.payload = comm.payload, None
        comm.recv = payload.new_empty((sum(comm.out_splits), payload.shape[1]))
        comm.send = payload
        comm.work = dist.all_to_all_single(comm.recv, payload, comm.out_splits, comm.in_splits, group=comm.group,
                                           async_op=True)
        comm.post_side(side)
        ctx.comm = comm
        return _ghost(ghost, sum(comm.out_splits))


def _unpack(payload: torch.Tensor, h: int, rows=None):
    """[R, h + 4 h/128] uint8 -> (q [R', h] e4m3, s [R', h/128] float32), rows R' = payload[rows] if given."""
    q, s = payload[:, :h], payload[:, h:]
    if rows is not None:
        q, s = q.index_select(0, rows), s.index_select(0, rows)
    return q.contiguous().view(FP8), s.contiguous().view(torch.float32)


def fp8_dispatch(x: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, async_op: bool = False):
    """x [T, h], gates [T, k] -> FP8Rows of this rank's expert input rows and their gates (a Pending with async_op),
    the FP8 counterpart of moe.dispatch.dispatch: the same rows, in the same order."""
    from megatron_dsv3.fp8.linear import quantizer
    h = x.shape[1]
    with torch.no_grad():
        q, s = quantizer("quantize_tiles")(x.detach(), pow2_scales=True)              # [T, h], [T, h/128]
    ghost = _GhostPermute.apply(x, plan.pos)                                         # [T*k, h]
    g_sorted = gates.reshape(-1).index_select(0, plan.order)                          # [T*k]
    if plan.ep == 1:
        q, s = q.index_select(0, plan.token_of_row), s.index_select(0, plan.token_of_row)
        p = Pending(ghost, then=lambda g: FP8Rows(g, q, s, g_sorted))    # cut() needs a tensor in flight
        return p if async_op else p.wait()
    payload = torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)   # [T, h + 4 h/128]
    comm = _Comm(plan.recv_splits, plan.send_splits, plan.group)
    comm.payload = payload.index_select(0, plan.token_of_row)                         # [T*k, ...] by global expert
    regroup = plan.regroup

    def received(g: torch.Tensor, row_gates: torch.Tensor) -> FP8Rows:                # (src, e) -> (e, src)
        recv, comm.recv = comm.recv, None
        return FP8Rows(_GhostRegroup.apply(g, regroup), *_unpack(recv, h, regroup),
                       row_gates.index_select(0, regroup))

    p = Pending(_PayloadStart.apply(ghost, comm, g_sorted), comm, then=received)
    return p if async_op else p.wait()


class FP8DispatchMoE(DeepSeekMoE):
    """DeepSeekMoE whose dispatch seam sends the tokens in FP8 (module docstring); everything else is
    DeepSeekMoE's. specs.py picks it with FP8GroupedExperts when FP8Config.dispatch_fp8 is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from megatron_dsv3.fp8.experts import FP8GroupedExperts
        if not isinstance(self.experts, FP8GroupedExperts):
            raise ValueError(f"FP8DispatchMoE sends the tokens in FP8 for FP8GroupedExperts, got "
                             f"{type(self.experts).__name__}: keep FP8Config.dispatch_fp8 for FP8 experts only")

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, async_op: bool = False):
        """[T', h], gates [T', k] -> FP8Rows of this rank's expert input rows and their gates (a Pending with
        async_op)."""
        return fp8_dispatch(x, plan, gates, async_op=async_op)

    def compute_experts(self, rows: FP8Rows, plan: DispatchPlan) -> torch.Tensor:
        """FP8Rows (or the list the overlap executor makes of it) -> the gate-scaled expert outputs [N, h]."""
        ghost, q, s, gates = rows
        return self.experts((ghost, q, s), plan.local_counts, gates)
