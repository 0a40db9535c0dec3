"""Cross entropy over a vocabulary-parallel output layer, its gradient computed in the forward pass.

The output head's logits are the largest activation of the model: [s, b, V/tp] with V = 129280, 1.06 GB in bf16 at
4096 tokens. megatron-core's `vocab_parallel_cross_entropy` casts them to float32 and keeps exp(logits) in float32
for backward (2.1 GB at 4096 tokens, ~0.5 MB per token) and makes several float32 passes over them. Here two Triton
passes over the bf16 logits do the whole job:

    pass 1 (per token, over this rank's vocabulary slice): running max m and sum_j exp(x_j - m), and the target's
            logit if the target falls in this slice;   then across TP: M = max over ranks of m,
            Z = sum over ranks of sum_j exp(x_j - m) * exp(m - M), target logit summed (one rank holds it);
            loss = M + log Z - x_target                                                 (per token)
    pass 2 writes d loss / d x_j = softmax_j - [j == target] over the logits IN PLACE (bf16),

and backward only multiplies each row by its token's incoming gradient (a third pass, also in place). Kept for
backward: that one bf16 [s, b, V/tp] buffer, half of megatron's float32 one, and no float32 copy ever exists. The
caller gives up its logits (`consume_logits=True` says so): our model computes the loss from logits nobody else
reads.

`cross_entropy_reference` is the plain-torch definition (float32 log-softmax) the kernels are tested against; off
CUDA, megatron-core's own vocab_parallel_cross_entropy runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["vocab_parallel_cross_entropy", "cross_entropy_reference", "fused_cross_entropy_triton"]

_BLOCK = 4096


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [..., V] (the full vocabulary), labels [...] -> per-token loss [...] in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)


if HAVE_TRITON:
    @triton.jit
    def _ce_stats_kernel(x_ptr, lab_ptr, m_ptr, d_ptr, tgt_ptr, v_start, V: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        row = x_ptr + t * V
        lab = tl.load(lab_ptr + t).to(tl.int64) - v_start
        # a finite sentinel instead of -inf: no inf - inf anywhere (masked lanes add exactly 0)
        m = tl.full([BLOCK], -1e30, tl.float32)
        d = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, V, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(row + offs, mask=mask, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, x)
            d = d * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
            m = m_new
        mx = tl.max(m, axis=0)
        dsum = tl.sum(d * tl.exp(m - mx), axis=0)
        tl.store(m_ptr + t, mx)
        tl.store(d_ptr + t, dsum)
        here = (lab >= 0) & (lab < V)
        x_t = tl.load(row + tl.where(here, lab, 0)).to(tl.float32)
        tl.store(tgt_ptr + t, tl.where(here, x_t, 0.0))

    @triton.jit
    def _ce_grad_kernel(x_ptr, lab_ptr, lse_ptr, v_start, V: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        row = x_ptr + t * V
        lab = tl.load(lab_ptr + t).to(tl.int64) - v_start
        lse = tl.load(lse_ptr + t)
        for j0 in range(0, V, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == lab, 1.0, 0.0)
            tl.store(row + offs, g.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_scale_kernel(g_ptr, s_ptr, s_stride, V: tl.constexpr, BLOCK: tl.constexpr):
        # g[t, j] *= s[t]: one token's row slice per program, the product in float32, one rounding to g's dtype
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < V
        scale = tl.load(s_ptr + t * s_stride).to(tl.float32)
        ptr = g_ptr + t * V + offs
        g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        V = logits.shape[-1]
        x = logits.detach().view(-1, V)                     # [T, V/tp]: overwritten by the gradient below
        if not x.is_contiguous():
            raise ValueError("fused cross entropy needs contiguous logits")
        lab = labels.reshape(-1).contiguous()
        T = x.shape[0]
        tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        v_start = dist.get_rank(group) * V if tp > 1 else 0
        m = torch.empty(T, dtype=torch.float32, device=x.device)
        d = torch.empty_like(m)
        tgt = torch.empty_like(m)
        if T:
            _ce_stats_kernel[(T,)](x, lab, m, d, tgt, v_start, V=V, BLOCK=min(_BLOCK, triton.next_power_of_2(V)))
        if tp > 1:                                          # combine the vocabulary slices
            mx = m.clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            d = d * torch.exp(m - mx)
            dist.all_reduce(d, group=group)
            dist.all_reduce(tgt, group=group)
            m = mx
        lse = m + torch.log(d)                              # [T] log sum_j exp(x_j), all ranks' slices
        if T:
            _ce_grad_kernel[(T,)](x, lab, lse, v_start, V=V, BLOCK=min(_BLOCK, triton.next_power_of_2(V)))
        ctx.save_for_backward(x)
        ctx.shape = logits.shape
        return (lse - tgt).view(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        (g,) = ctx.saved_tensors                            # [T, V/tp] softmax - onehot
        # each row times its token's incoming gradient, in place (the buffer is not needed again). torch's
        # broadcasting mul_ of a [T, 1] column ran a non-vectorised kernel: 1.6 ms for the 1.06 GB of a V3 step's
        # logits on the H200 (1.3 TB/s); this pass reads and writes each element once at the copy rate.
        T, V = g.shape
        s = dloss.reshape(-1)                               # [T] (a stride-0 view when dloss is an expanded scalar)
        if T:
            block = min(8192, triton.next_power_of_2(V))
            _ce_scale_kernel[(T, triton.cdiv(V, block))](g, s, s.stride(0), V=V, BLOCK=block)
        return g.view(ctx.shape), None, None


def fused_cross_entropy_triton(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """The Triton path on any device (CPU under TRITON_INTERPRET=1). logits [..., V/tp] are CONSUMED: overwritten
    by the gradient. labels [...] global vocabulary ids -> per-token loss [...] float32."""
    return _FusedCrossEntropy.apply(logits, labels, group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None,
                                 consume_logits: bool = False) -> torch.Tensor:
    """Per-token cross entropy over the TP-split vocabulary. With consume_logits on CUDA: the fused kernels (the
    logits are overwritten); otherwise megatron-core's vocab_parallel_cross_entropy."""
    if consume_logits and HAVE_TRITON and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16,
                                                                             torch.float32):
        return fused_cross_entropy_triton(logits, labels, group)
    from megatron.core import tensor_parallel
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
