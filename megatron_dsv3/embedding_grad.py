"""The word embedding's weight gradient added row by row into the buffer that holds it, never made dense.

A lookup's gradient touches only the rows of the tokens in the batch (4,096 of V = 129,280 at V3 width), but
F.embedding's backward returns a dense [V, h] gradient: a 1.85 GB zero fill and scatter in bf16, then
AccumulateGrad (or megatron DDP's hook, into a float32 main_grad) reads and writes the whole of it again, ~2 ms of
an H200 step for 4,096 rows of data, and a 1.85 GB transient. Here, where a buffer exists (`main_grad` under
megatron DDP, or an existing `.grad`), backward adds the token rows straight into it, as fused_wgrad.py does for the
linears (the same protocol: megatron's dummy gradient + grad_added_to_main_grad, and only when this backward pass
will run the weight's AccumulateGrad: DualPipe's split passes); without one it returns torch's own dense gradient.

The rows are summed without atomics and in a fixed order, so the result is deterministic: the token ids are sorted
(stably), each run of one id is summed in float32 by one program per h-chunk, in the tokens' order, and added to
its row with one rounding (`accumulate_rows_triton`; `accumulate_rows_reference` is the plain-torch form, used off
CUDA). VocabParallelEmbeddingRowGrad is megatron-core's VocabParallelEmbedding with this lookup in training (same
parameters, masking, reductions); anything else (inference, megatron's gtp rematerialisation) runs its own forward.
DSV3Model.embedding_row_grad (on; bench_stack's ours-dense-embedding-grad is the dense form) chooses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                     reduce_scatter_to_sequence_parallel_region)

from megatron_dsv3.fused_wgrad import ACCUMULATE, NOT_NEEDED, grad_need

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines without Triton: the reference is used
    HAVE_TRITON = False

__all__ = ["embedding_row_grad", "accumulate_rows", "accumulate_rows_reference", "accumulate_rows_triton",
           "VocabParallelEmbeddingRowGrad"]


def accumulate_rows_reference(buf: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """buf [V, h] += the rows of grad [T, h] summed per id (ids [T]): each touched row summed in float32 (float64
    for a float64 buffer), then added to buf with one rounding. In token order on the CPU; on CUDA index_add_ adds
    with atomics (an order that varies), which is why accumulate_rows takes the kernel there."""
    acc_dtype = torch.float64 if buf.dtype == torch.float64 else torch.float32
    uniq, inverse = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(uniq.numel(), grad.shape[1], dtype=acc_dtype, device=grad.device)
    sums.index_add_(0, inverse, grad.to(acc_dtype))
    buf[uniq] = (buf[uniq].to(acc_dtype) + sums).to(buf.dtype)


if HAVE_TRITON:
    @triton.jit
    def _rows_kernel(ids_ptr, order_ptr, ends_ptr, g_ptr, buf_ptr, H, stride_g, stride_b, BH: tl.constexpr,
                     R: tl.constexpr):
        i = tl.program_id(0)
        row = tl.load(ids_ptr + i).to(tl.int64)
        prev = tl.load(ids_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
        if (i == 0) | (prev != row):                     # the first position of this id's run owns the row
            cols = tl.program_id(1) * BH + tl.arange(0, BH)
            cmask = cols < H
            acc = tl.zeros([BH], dtype=tl.float32)
            j = i
            end = tl.load(ends_ptr + i)
            while j < end:    # the run (the sort is stable: the tokens' order), R rows a step: a frequent id (a
                rr = j + tl.arange(0, R)                 # padding token thousands of times) stays a short loop
                rm = rr < end
                t = tl.load(order_ptr + rr, mask=rm, other=0).to(tl.int64)
                tile = tl.load(g_ptr + t[:, None] * stride_g + cols[None, :], mask=rm[:, None] & cmask[None, :],
                               other=0.0).to(tl.float32)                          # [R, BH]
                acc += tl.sum(tile, axis=0)              # a fixed reduction order: deterministic
                j += R
            dst = buf_ptr + row * stride_b + cols
            old = tl.load(dst, mask=cmask, other=0.0).to(tl.float32)
            tl.store(dst, (old + acc).to(buf_ptr.dtype.element_ty), mask=cmask)


def accumulate_rows_triton(buf: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, block_h: int = 512,
                           rows: int = 16) -> None:
    """accumulate_rows_reference's contract in one launch (no host sync, no atomics). buf [V, h] float32 / bf16 /
    fp16, rows contiguous; ids [T] int; grad [T, h]."""
    T, H = grad.shape
    if T == 0 or H == 0:
        return
    if buf.stride(1) != 1 or grad.stride(1) != 1:
        raise ValueError("accumulate_rows_triton needs rows contiguous in buf and grad")
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)                            # [T], [T]
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True).to(torch.int32)   # each run's end
    bh = min(block_h, triton.next_power_of_2(H))
    _rows_kernel[(T, triton.cdiv(H, bh))](sorted_ids, order, ends, grad, buf, H, grad.stride(0), buf.stride(0),
                                          BH=bh, R=rows)


def accumulate_rows(buf: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """The kernel on CUDA (float32 / bf16 / fp16 buffers), the reference elsewhere."""
    if HAVE_TRITON and buf.is_cuda and buf.dtype != torch.float64:
        accumulate_rows_triton(buf, ids, grad)
    else:
        accumulate_rows_reference(buf, ids.reshape(-1), grad)


class _EmbeddingRowGrad(torch.autograd.Function):
    """F.embedding(ids, weight); backward: the rows added into weight's gradient buffer (module docstring)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight)                                           # [..., h]

    @staticmethod
    def backward(ctx, dout):
        ids, weight = ctx.saved_tensors
        need = grad_need(ctx, 1)
        if need == NOT_NEEDED:
            return None, None
        flat, g = ids.reshape(-1), dout.reshape(-1, dout.shape[-1])                # [T], [T, h]
        if need == ACCUMULATE:
            main = getattr(weight, "main_grad", None)
            if main is not None:
                accumulate_rows(main, flat, g)
                if hasattr(weight, "grad_added_to_main_grad"):
                    # megatron DDP's convention (as fused_wgrad.py): its hook runs on the dummy, skips its add
                    weight.grad_added_to_main_grad = True
                    return None, torch.empty_like(weight)
                return None, None
            if weight.grad is not None and weight.grad.is_contiguous():
                accumulate_rows(weight.grad, flat, g)
                return None, None
        # no buffer yet (a first backward), or a gradient torch.autograd.grad captures: torch's dense one
        return None, torch.ops.aten.embedding_dense_backward(g, flat, weight.shape[0], -1, False)


def embedding_row_grad(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, weight) whose weight gradient is added row by row into the weight's buffer (module
    docstring). ids [...] int -> [..., h]."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(ids, weight)
    return _EmbeddingRowGrad.apply(ids, weight)


class VocabParallelEmbeddingRowGrad(VocabParallelEmbedding):
    """megatron-core's VocabParallelEmbedding (this class is assigned to the instance LanguageModelEmbedding built:
    same parameters, attributes, checkpoint layout) whose training forward looks up through embedding_row_grad:
    the vocabulary mask of tensor parallelism, the zeroed rows of other ranks' tokens and the TP reduction (or the
    reduce-scatter into the sequence-parallel region) as megatron-core does them. Inference and megatron's gtp
    rematerialisation take megatron-core's own forward."""

    def forward(self, input_):
        if not self.training or getattr(self, "gtp_remat_size", 1) > 1 or not torch.is_grad_enabled():
            return super().forward(input_)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        if tp > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)
        else:
            masked_input = input_
        output_parallel = embedding_row_grad(masked_input, self.weight)            # [b, s, h]
        if tp > 1:   # other ranks' tokens: zero here (their gradient rows, zeros, land on row 0: a no-op)
            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()          # [b s h] -> [s b h]
            return reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
