"""FP8 linear layers as the paper's Figure 6 (DeepSeek-V3 section 3.3): Fprop, Dgrad and Wgrad all in FP8.

    Fprop  y  = x @ W^T        x in 1x128 tiles (online scales), W in 128x128 blocks          -> y in x's dtype
    Dgrad  dx = dy @ W         dy in 1x128 tiles, W^T in 128x128 blocks (W's blocks, transposed) -> dx in dy's dtype
    Wgrad  dW = dy^T @ x       both contracted over tokens: dy and x in 128x1 tiles            -> dW in W's dtype

Every GEMM accumulates in FP32 with promotion every 128 elements of K (fp8/gemm.py). Master weights stay in the
parameter dtype (FP32 or BF16, DSV3Config.params_dtype); the weight gradient is returned in it, or accumulated into
megatron's FP32 `main_grad` when gradient_accumulation_fusion is on.

What backward keeps (why this is an autograd Function): only the FP8 copy of the input transposed to [K, M] with its
128x1 scales (`quantize_tiles_and_transpose` makes both copies in one read of x: the 1x128 one feeds Fprop and is
dropped), 1 byte per element instead of x's 2. The FP8 weight is not saved per micro-batch: with the weight cache
(fp8/weight_cache.py, FP8Config.weight_cache, on by default) its blocks and their transpose are made once per
optimizer step and shared by all micro-batches; without it backward quantises the master weight again
(deterministic, so bit-identical to Fprop's).

The modules are drop-ins for the linears our specs use (specs.py picks them when FP8Config.enabled):
  FP8ColumnParallelLinear / FP8RowParallelLinear: megatron-core's Column/RowParallelLinear with the matmul replaced
      (same parameters, init, checkpoint layout, TP communication: the input all-gather under sequence parallelism and
      the input-gradient all-reduce are megatron's differentiable mappings around the FP8 Function);
  FP8DuplicatedLinear: mla/linear.py's DuplicatedLinear (MLA down-projections).
"""
from __future__ import annotations

from typing import Tuple

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_dsv3.fused_wgrad import ACCUMULATE, NOT_NEEDED, grad_need, wgrad_buffer
from megatron_dsv3.fp8.weight_cache import cache_mode
from megatron_dsv3.mla.linear import DuplicatedLinear

__all__ = ["fp8_linear", "quantizer", "FP8LinearFunction", "FP8ColumnParallelLinear", "FP8RowParallelLinear",
           "FP8DuplicatedLinear", "quantize_weight", "weight_blocks"]


# ---- the quantisers (fp8/kernels.py's dispatchers where they exist, else quant.py) and the GEMMs of gemm.py ------
def quantizer(name: str):
    """quant.py's `name`, or its dispatcher `name`_fast in fp8/kernels.py where there is one (Triton on CUDA, bit-exact
    with quant.py; quant.py elsewhere)."""
    from megatron_dsv3.fp8 import kernels, quant
    return getattr(kernels, name + "_fast", None) or getattr(quant, name)


def _tiles_and_transpose(x: torch.Tensor):
    """x [M, K] -> (q [M, K], s [M, K/128], qt [K, M], st [K, M/128]): the 1x128 copy and the 128x1 copy transposed."""
    return quantizer("quantize_tiles_and_transpose")(x)


def quantize_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q [N, K] e4m3, scale [N/128, K/128]): the 128x128 blocks of Fprop (and, transposed, of Dgrad)."""
    return quantizer("quantize_blocks")(w)


def weight_blocks(w: torch.Tensor, transposed: bool = False, cache=False):
    """quantize_weight(w), or its transpose (W^T's blocks, for Dgrad). cache (FP8Config.weight_cache): True, both
    copies made by one pass at the first use (kernels.quantize_blocks_and_transpose_fast) and kept for the step;
    "fprop", Fprop's blocks kept and W^T's made from them by a byte transpose (the same bits: a 128x128 block's
    amax is its transpose's); False, quantised here."""
    from megatron_dsv3.fp8.kernels import quantize_blocks_and_transpose_fast, quantize_blocks_transposed_fast
    from megatron_dsv3.fp8.weight_cache import FPROP, cached, transposed_blocks
    if cache == FPROP:
        blocks = cached(w, "blocks", quantize_weight)
        return transposed_blocks(*blocks) if transposed else blocks
    if cache:
        both = cached(w, "blocks_and_t", quantize_blocks_and_transpose_fast)
        return both[2:] if transposed else both[:2]
    with torch.no_grad():
        return quantize_blocks_transposed_fast(w) if transposed else quantize_weight(w)


def _gemm(a_q, a_s, b_q, b_s, out_dtype):
    """deq(a) [M, K] @ deq(b) [N, K]^T -> [M, N] in out_dtype; b in 128x128 blocks or 1x128 tiles (by b_s's shape)."""
    from megatron_dsv3.fp8.gemm import fp8_gemm
    return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x @ W^T with the three GEMMs of the module docstring. x [..., K], W [N, K] -> y [..., N] (x's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, wgrad_into_main_grad: bool, weight_cache=False):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)                                               # [M, K]
        q, s, qt, st = _tiles_and_transpose(x2)
        w_q, w_s = weight_blocks(weight, cache=weight_cache)
        y = _gemm(q, s, w_q, w_s, x.dtype)                                  # [M, N]  Fprop
        need_wgrad = weight.requires_grad
        ctx.save_for_backward(qt if need_wgrad else None, st if need_wgrad else None, weight)
        ctx.x_shape, ctx.x_dtype, ctx.into_main_grad = x.shape, x.dtype, wgrad_into_main_grad
        ctx.weight_cache = weight_cache
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qt, st, weight = ctx.saved_tensors
        N = weight.shape[0]
        dy2 = dy.reshape(-1, N)                                             # [M, N]
        g_q, g_s, gt_q, gt_s = _tiles_and_transpose(dy2)
        dx = dw = None
        # only what this pass uses (DualPipe's B pass: dx; its W pass: dW, once, fused_wgrad.grad_need)
        need_x, need_w = grad_need(ctx, 0), grad_need(ctx, 1)
        if need_x != NOT_NEEDED:
            # Dgrad: dy [M, N] @ W [N, K]; W^T [K, N] in 128x128 blocks is W's blocks transposed (the same bits as
            # Fprop's, cached or made again)
            wt_q, wt_s = weight_blocks(weight, transposed=True, cache=ctx.weight_cache)
            dx = _gemm(g_q, g_s, wt_q, wt_s, ctx.x_dtype).view(ctx.x_shape)
        if need_w != NOT_NEEDED:
            # Wgrad: dy^T [N, M] @ x [M, K], contracted over the M tokens in 1x128 tiles of the transposed copies
            dw = _weight_grad(weight, lambda dt: _gemm(gt_q, gt_s, qt, st, dt),            # [N, K]
                              ctx.into_main_grad and need_w == ACCUMULATE, need_w == ACCUMULATE)
        return dx, dw, None, None


def _weight_grad(weight: torch.Tensor, wgrad, into_main_grad: bool, accumulate: bool):
    """The weight gradient as megatron expects it, wgrad(dtype) being the Wgrad GEMM (FP32 accumulation, output in
    dtype): added in FP32 to `main_grad` (gradient accumulation fusion; a dummy .grad is returned when megatron's
    DDP asks for one, as megatron-core's linear does); else added in FP32 to an existing .grad when the engine would
    add it there anyway (accumulate: gradient accumulation without DDP, a benchmark's repeated steps: one add, no
    W-dtype copy, as fused_wgrad's linears); else returned, written by the GEMM in W's dtype."""
    if into_main_grad and hasattr(weight, "main_grad"):
        weight.main_grad.add_(wgrad(torch.float32))
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            zero = getattr(weight, "zero_out_wgrad", False)
            return (torch.zeros if zero else torch.empty)(weight.main_grad.shape, dtype=weight.dtype,
                                                          device=weight.device)
        return None
    buf = wgrad_buffer(weight) if accumulate else None
    if buf is not None and buf is weight.grad:        # no DDP (its main_grad is its hook's to fill)
        buf.add_(wgrad(torch.float32))                # old + new in FP32, rounded once to .grad's dtype
        return None
    return wgrad(weight.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, wgrad_into_main_grad: bool = False,
               weight_cache=False) -> torch.Tensor:
    """F.linear in FP8: x [..., K], weight [N, K] (param dtype), bias [N] or None -> [..., N] in x's dtype.
    weight_cache: W's FP8 copies from the per-step cache (fp8/weight_cache.py; True, "fprop" or False)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight [{weight.shape[0]}, "
                         f"{weight.shape[1]}] expects {weight.shape[1]}")
    y = FP8LinearFunction.apply(x, weight, bool(wgrad_into_main_grad), cache_mode(weight_cache))
    return y if bias is None else y + bias


def _tp_fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                         sequence_parallel=False, tp_group=None, weight_cache=False, **_unused):
    """megatron-core's linear_with_grad_accumulation_and_async_allreduce, in FP8: the same communication, through
    megatron's differentiable mappings (all-gather of the input over TP under SP, reduce-scatter of its gradient;
    otherwise the all-reduce of the input gradient when asked); the grad_output_buffer of deferred embedding wgrad
    is not supported (the embedding and output head stay in BF16)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    return fp8_linear(input, weight, bias, wgrad_into_main_grad=gradient_accumulation_fusion,
                      weight_cache=weight_cache)


class FP8ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with its GEMMs in FP8 (module docstring)."""
    fp8_weight_cache = True                  # fp8/weight_cache.py; weight_cache.configure sets it from FP8Config

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward_impl(input, weight, *args, weight_cache=self.fp8_weight_cache, **kwargs)


class FP8RowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear with its GEMMs in FP8 (module docstring)."""
    fp8_weight_cache = True

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward_impl(input, weight, *args, weight_cache=self.fp8_weight_cache, **kwargs)


class FP8DuplicatedLinear(DuplicatedLinear):
    """mla/linear.py's DuplicatedLinear (MLA's down-projections) with its GEMMs in FP8."""
    fp8_weight_cache = True

    def forward(self, x: torch.Tensor):
        c = self.fp8_weight_cache
        if self.skip_bias_add:
            return fp8_linear(x, self.weight, weight_cache=c), self.bias
        return fp8_linear(x, self.weight, self.bias, weight_cache=c), None
