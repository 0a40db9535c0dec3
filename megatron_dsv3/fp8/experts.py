"""The routed experts with their GEMMs in FP8 (DeepSeek-V3 sections 3.3.2-3.3.3): GroupedExperts with one method,
`expert_mlp` (moe/experts.py's expert-GEMM hook), replaced. Parameters, init, checkpoint layout: GroupedExperts'.

Per expert e, on its rows (x sorted by local expert, offs = cumulative counts), W1 = weight1[e] [h, 2f], W2 = weight2[e]:

    Fprop  h1 = x @ W1              x in 1x128 tiles, power-of-2 scales (section 3.3.3: the MoE up-projection's input)
           a  = g * SwiGLU(h1)      g [N]: the rows' gates (row_scale; moe/dispatch.py), applied before a's FP8
                                    quantisation as in the BF16 experts; h1 kept for backward in FP8 (1x128 tiles);
                                    a is not kept, it is recomputed
           y  = a @ W2              a in 1x128 tiles
    Dgrad  da  = dy @ W2^T          dy in 1x128 tiles, power-of-2 scales (the activation gradient before the
                                    down-projection, section 3.3.3)
           dh1 = g SwiGLU'(h1) da   from the FP8 copy of h1, which also gives a again and dg = <da, SwiGLU(h1)>
           dx  = dh1 @ W1^T         dh1 in 1x128 tiles
    Wgrad  dW2 = a^T @ dy, dW1 = x^T @ dh1: contracted over each expert's tokens, both operands in 128x1 tiles that
           restart at the expert's first row (quant.quantize_columns_grouped; gemm.fp8_grouped_wgrad), written
           in the parameters' layout and dtype by the GEMM itself, added by it into the gradient buffer where
           one exists (main_grad or .grad, as fused_wgrad.py's rule)

Weights in 128x128 blocks (a block of W is a block of W^T, so Fprop and Dgrad use the same blocks, transposed for
one of them). With FP8Config.weight_cache (default on; fp8/weight_cache.py) both copies of each weight are made once
per optimizer step and shared by all micro-batches; off, each GEMM quantises its weight again (the same bits).
GEMMs accumulate in FP32 (gemm.py); outputs in x's dtype, weight gradients in the parameter dtype. Kept for backward:
the FP8 transposed copy of x with its column scales (the Wgrad operand; the 1x128 copy for Fprop is dropped) and the
FP8 copy of h1 -- 1 byte per element each, against 2 for BF16 x and h1 and 2 more for a in the BF16 experts.

x may also come already in FP8, as the FP8 dispatch delivers it (fp8/dispatch.py: FP8Rows, or the list the overlap
executor makes of it): (rows, q, s) with q, s the 1x128 pow2 tiles above, taken as they are, and rows the stand-in
that carries the gradient. The Wgrad copy of x is then re-tiled from deq(q, s) (section 3.5.2's dequantise,
transpose, re-quantise); Fprop, Dgrad, dW2 are unchanged bit for bit.
"""
from __future__ import annotations

import torch

from megatron_dsv3.fp8.grouped_gemm import TileSchedule
from megatron_dsv3.fp8.kernels import bounded_row_tiles, use_triton
from megatron_dsv3.fused_wgrad import ACCUMULATE, NOT_NEEDED, wgrad_buffer, grad_need
from megatron_dsv3.fp8.linear import quantizer
from megatron_dsv3.fp8.weight_cache import cache_mode
from megatron_dsv3.moe.experts import GroupedExperts
from megatron_dsv3.moe.kernels import swiglu

__all__ = ["FP8GroupedExperts", "fp8_expert_mlp", "expert_weight_blocks"]


def expert_weight_blocks(w: torch.Tensor, transposed: bool, cache=False):
    """w [E, A, B] -> the 128x128 blocks of each expert's matrix (q [E, A, B], s [E, A/128, B/128]), or with
    transposed=True those of its transpose (q [E, B, A], s [E, B/128, A/128]); from the per-step cache when cache is
    on (fp8/weight_cache.py; "fprop": only Fprop's copy, the transposed one, is kept, Dgrad's is its byte
    transpose)."""
    from megatron_dsv3.fp8.kernels import (quantize_blocks_and_transpose_fast, quantize_blocks_fast,
                                           quantize_blocks_transposed_fast)
    from megatron_dsv3.fp8.weight_cache import FPROP, cached, transposed_blocks
    if cache == FPROP:
        fprop = cached(w, "expert_blocks_t", quantize_blocks_transposed_fast)
        return fprop if transposed else transposed_blocks(*fprop)
    if not cache:                            # only the copy asked for (the other would be a transient of 1 B/param)
        with torch.no_grad():
            return quantize_blocks_transposed_fast(w) if transposed else quantize_blocks_fast(w)
    # both copies from one read (Fprop takes the transposed one, Dgrad the other): made once per step with the cache
    both = cached(w, "expert_blocks_and_t", quantize_blocks_and_transpose_fast, cache)
    return both[2:] if transposed else both[:2]


def _swiglu_and_grad(h1: torch.Tensor, da: torch.Tensor, row_scale=None):
    """(a = g SwiGLU(h1), dh1, dg = <da, SwiGLU(h1)> per row, float32; None without g) through moe.kernels.swiglu's
    own backward (Triton on CUDA)."""
    with torch.enable_grad():
        h1 = h1.detach().requires_grad_()
        g = None if row_scale is None else row_scale.detach().requires_grad_()
        a = swiglu(h1, g)
        grads = torch.autograd.grad(a, [h1] if g is None else [h1, g], da)
    return a.detach(), grads[0], (grads[1] if g is not None else None)


def _wgrad(fp8_grouped_wgrad, weight: torch.Tensor, need: int, *operands):
    """The experts' weight gradient: written by the GEMM into the buffer that holds it where one exists (megatron
    DDP's main_grad, else an existing .grad: fused_wgrad's rule; an add of [E, ...] saved, 2.1 ms per MoE layer on
    the H200), returned as a fresh tensor otherwise (first micro-batch, or a gradient torch.autograd.grad
    captures). Returns what backward gives autograd for the weight."""
    buf = wgrad_buffer(weight) if need == ACCUMULATE else None
    if buf is None or tuple(buf.shape) != tuple(weight.shape) or buf.stride(-1) != 1:
        return fp8_grouped_wgrad(*operands, out_dtype=weight.dtype)
    fp8_grouped_wgrad(*operands, out_dtype=buf.dtype, out=buf, accumulate=True)
    if buf is not weight.grad and hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True          # megatron DDP: its hook runs on this dummy, skips its add
        return torch.empty_like(weight)
    return None


class FP8ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                x_q=None, x_s=None, weight_cache=False, grouped: str = "host_loop", row_scale=None):
        from functools import partial

        from megatron_dsv3.fp8 import gemm
        tiles, columns = quantizer("quantize_tiles"), quantizer("quantize_columns_grouped")
        offs = torch.cumsum(counts, 0).to(torch.int32)                                  # [E] group ends
        # the Triton GEMMs' row-tile schedule, made once for this layer's four grouped GEMMs (same groups, same rows)
        schedule = TileSchedule.of(offs, x.shape[0]) if grouped == "triton" else None
        fp8_grouped_gemm = partial(gemm.fp8_grouped_gemm, backend=grouped, schedule=schedule)
        w1t = expert_weight_blocks(weight1, True, weight_cache)                        # [E, 2f, h] blocks
        w2t = expert_weight_blocks(weight2, True, weight_cache)                        # [E, h, f]
        if x_q is None:
            x_q, x_s = tiles(x, pow2_scales=True)
        else:                                   # dispatched in FP8: x is the gradient's stand-in, never read
            x = quantizer("dequantize_tiles")(x_q, x_s, dtype=x.dtype)                 # exact (e4m3 x 2^n)
        h1 = fp8_grouped_gemm(x_q, x_s, *w1t, offs, out_dtype=x.dtype)                # [N, 2f]
        a = swiglu(h1, row_scale)                                                       # [N, f] = g SwiGLU(h1)
        y = fp8_grouped_gemm(*tiles(a), *w2t, offs, out_dtype=x.dtype)                 # [N, h]
        h1_q, h1_s = tiles(h1)                                                          # SwiGLU input, FP8
        # the padded 128-row tiles of the experts' groups, made once for this layer's four Wgrad operands, sized by
        # a bound known on the host: no host sync in forward or backward
        row_tiles = bounded_row_tiles(offs, x.shape[0]) if use_triton(x) else None
        xt_q, xt_s, offs_p = columns(x, offs, pow2_scales=True, row_tiles=row_tiles)   # [h, Np]: Wgrad operand
        ctx.save_for_backward(offs, offs_p, xt_q, xt_s, h1_q, h1_s, weight1, weight2, row_scale)
        ctx.x_dtype, ctx.weight_cache, ctx.grouped, ctx.row_tiles = x.dtype, weight_cache, grouped, row_tiles
        ctx.schedule = schedule
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from functools import partial

        from megatron_dsv3.fp8 import gemm
        fp8_grouped_gemm = partial(gemm.fp8_grouped_gemm, backend=ctx.grouped, schedule=ctx.schedule)
        fp8_grouped_wgrad = partial(gemm.fp8_grouped_wgrad, backend=ctx.grouped)
        tiles, columns = quantizer("quantize_tiles"), quantizer("quantize_columns_grouped")
        deq = quantizer("dequantize_tiles")
        offs, offs_p, xt_q, xt_s, h1_q, h1_s, weight1, weight2, row_scale = ctx.saved_tensors
        dt = ctx.x_dtype
        dy = dy.contiguous()
        # only what this pass uses (DualPipe's B pass: dx and the gates' gradient; its W pass: dW1, dW2)
        need_x = grad_need(ctx, 0) != NOT_NEEDED
        need_w1, need_w2 = grad_need(ctx, 2), grad_need(ctx, 3)
        dx = dw1 = dw2 = None
        # down-projection: Dgrad (dy pow2 1x128 x W2's blocks), then Wgrad from the recomputed SwiGLU output
        w2_q, w2_s = expert_weight_blocks(weight2, False, ctx.weight_cache)            # [E, f, h] blocks
        dy_q, dy_s = tiles(dy, pow2_scales=True)
        da = fp8_grouped_gemm(dy_q, dy_s, w2_q, w2_s, offs, out_dtype=dt)              # [N, f]
        a, dh1, dg = _swiglu_and_grad(deq(h1_q, h1_s, dtype=dt), da, row_scale)        # [N, f], [N, 2f], [N]
        columns = partial(columns, row_tiles=ctx.row_tiles)
        if need_w2 != NOT_NEEDED:
            dyt_q, dyt_s, _ = columns(dy, offs, pow2_scales=True)                       # [h, Np]
            at_q, at_s, _ = columns(a, offs)                                            # [f, Np]
            # operands ordered so that dW comes out in the parameter's [E, f, h] layout and dtype: no transposed
            # float32 copy (at V3 width that copy was a 5 ms strided cast per MoE layer on the H200)
            dw2 = _wgrad(fp8_grouped_wgrad, weight2, need_w2, at_q, at_s, dyt_q, dyt_s, offs_p)  # [E, f, h] = a^T dy
        # up-projection: Dgrad (dh1 1x128 x W1's blocks) and Wgrad
        dh1 = dh1.to(dt)
        if need_x:
            w1_q, w1_s = expert_weight_blocks(weight1, False, ctx.weight_cache)        # [E, h, 2f] blocks
            dx = fp8_grouped_gemm(*tiles(dh1), w1_q, w1_s, offs, out_dtype=dt)         # [N, h]
        if need_w1 != NOT_NEEDED:
            dh1t_q, dh1t_s, _ = columns(dh1, offs)                                      # [2f, Np]
            dw1 = _wgrad(fp8_grouped_wgrad, weight1, need_w1, xt_q, xt_s, dh1t_q, dh1t_s, offs_p)  # [E, h, 2f]
        return dx, None, dw1, dw2, None, None, None, None, dg


def fp8_expert_mlp(x, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   weight_cache=False, grouped_gemm: str = "host_loop", row_scale=None) -> torch.Tensor:
    """(row_scale * SwiGLU(x @ weight1[e])) @ weight2[e] per expert block in FP8. x [N, h] sorted by expert, or
    (rows, q, s) as dispatched in FP8 (module docstring); counts [E]; row_scale [N] float32 (the rows' gates) or
    None -> [N, h]. weight_cache: fp8/weight_cache.py; grouped_gemm: the grouped GEMMs' backend
    (gemm.fp8_grouped_gemm / fp8_grouped_wgrad: host_loop | triton)."""
    x_fp8 = ()
    if not isinstance(x, torch.Tensor):
        x, *x_fp8 = x                                                                   # rows, q [N, h], s
    if x.shape[0] == 0:
        # as padded_swiglu: keep the graph (DDP wants the weights' zero gradients; the dispatch's backward is a
        # collective every EP rank must join)
        out = 0 * x + 0 * (weight1.sum() + weight2.sum())
        return out if row_scale is None else out + 0 * row_scale.sum()
    x_q, x_s = x_fp8 if x_fp8 else (None, None)
    return FP8ExpertsFunction.apply(x, counts, weight1, weight2, x_q, x_s, cache_mode(weight_cache), grouped_gemm,
                                    row_scale)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose expert GEMMs run in FP8 (module docstring); specs.py picks it when FP8 is on."""
    fp8_weight_cache = True                  # fp8/weight_cache.py; weight_cache.configure sets both from FP8Config
    fp8_grouped_gemm = "triton"              # FP8Config.grouped_gemm (its default)

    def expert_mlp(self, x: torch.Tensor, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   row_scale=None) -> torch.Tensor:
        return fp8_expert_mlp(x, counts, weight1, weight2, weight_cache=self.fp8_weight_cache,
                              grouped_gemm=self.fp8_grouped_gemm, row_scale=row_scale)
