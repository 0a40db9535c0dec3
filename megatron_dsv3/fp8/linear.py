"""FP8 linear layers as the paper's Figure 6 (DeepSeek-V3 section 3.3): Fprop, Dgrad and Wgrad all in FP8.

    Fprop  y  = x @ W^T        x in 1x128 tiles (online scales), W in 128x128 blocks          -> y in x's dtype
    Dgrad  dx = dy @ W         dy in 1x128 tiles, W^T in 128x128 blocks (W's blocks, transposed) -> dx in dy's dtype
    Wgrad  dW = dy^T @ x       both contracted over tokens: dy and x in 128x1 tiles            -> dW in W's dtype

Every GEMM accumulates in FP32 with promotion every 128 elements of K (fp8/gemm.py). Master weights stay in the
parameter dtype (FP32 or BF16, DSV3Config.params_dtype); the weight gradient is returned in it, or accumulated into
megatron's FP32 `main_grad` when gradient_accumulation_fusion is on.

What backward keeps (why this is an autograd Function): only the FP8 copy of the input transposed to [K, M] with its
128x1 scales (`quantize_tiles_and_transpose` makes both copies in one read of x: the 1x128 one feeds Fprop and is
dropped), 1 byte per element instead of x's 2. The FP8 weight is not kept: backward quantises the master weight again
(deterministic, so bit-identical to Fprop's) rather than holding one FP8 copy of every weight per micro-batch in
flight; a weight read costs N*K bytes against the GEMMs' M*N*K flops.

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

from megatron_dsv3.mla.linear import DuplicatedLinear

__all__ = ["fp8_linear", "quantizer", "FP8LinearFunction", "FP8ColumnParallelLinear", "FP8RowParallelLinear",
           "FP8DuplicatedLinear", "quantize_weight"]


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


def _gemm(a_q, a_s, b_q, b_s, out_dtype):
    """deq(a) [M, K] @ deq(b) [N, K]^T -> [M, N] in out_dtype; b in 128x128 blocks or 1x128 tiles (by b_s's shape)."""
    from megatron_dsv3.fp8.gemm import fp8_gemm
    return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x @ W^T with the three GEMMs of the module docstring. x [..., K], W [N, K] -> y [..., N] (x's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, wgrad_into_main_grad: bool):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)                                               # [M, K]
        q, s, qt, st = _tiles_and_transpose(x2)
        w_q, w_s = quantize_weight(weight)
        y = _gemm(q, s, w_q, w_s, x.dtype)                                  # [M, N]  Fprop
        need_wgrad = weight.requires_grad
        ctx.save_for_backward(qt if need_wgrad else None, st if need_wgrad else None, weight)
        ctx.x_shape, ctx.x_dtype, ctx.into_main_grad = x.shape, x.dtype, wgrad_into_main_grad
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qt, st, weight = ctx.saved_tensors
        N = weight.shape[0]
        dy2 = dy.reshape(-1, N)                                             # [M, N]
        g_q, g_s, gt_q, gt_s = _tiles_and_transpose(dy2)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_q, w_s = quantize_weight(weight)                              # the same bits as Fprop's
            # Dgrad: dy [M, N] @ W [N, K]; W^T [K, N] in 128x128 blocks is W's blocks transposed
            dx = _gemm(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # Wgrad: dy^T [N, M] @ x [M, K], contracted over the M tokens in 1x128 tiles of the transposed copies
            dw32 = _gemm(gt_q, gt_s, qt, st, torch.float32)                 # [N, K]
            dw = _to_weight_grad(weight, dw32, ctx.into_main_grad)
        return dx, dw, None


def _to_weight_grad(weight: torch.Tensor, dw32: torch.Tensor, into_main_grad: bool):
    """The FP32 weight gradient as megatron expects it: added to `main_grad` (gradient accumulation fusion; a dummy
    .grad is returned when megatron's DDP asks for one, as megatron-core's linear does) or returned in W's dtype."""
    if into_main_grad and hasattr(weight, "main_grad"):
        weight.main_grad.add_(dw32)
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            zero = getattr(weight, "zero_out_wgrad", False)
            return (torch.zeros if zero else torch.empty)(weight.main_grad.shape, dtype=weight.dtype,
                                                          device=weight.device)
        return None
    return dw32.to(weight.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, wgrad_into_main_grad: bool = False) -> torch.Tensor:
    """F.linear in FP8: x [..., K], weight [N, K] (param dtype), bias [N] or None -> [..., N] in x's dtype."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight [{weight.shape[0]}, "
                         f"{weight.shape[1]}] expects {weight.shape[1]}")
    y = FP8LinearFunction.apply(x, weight, bool(wgrad_into_main_grad))
    return y if bias is None else y + bias


def _tp_fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                         sequence_parallel=False, tp_group=None, **_unused):
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
    return fp8_linear(input, weight, bias, wgrad_into_main_grad=gradient_accumulation_fusion)


class FP8ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with its GEMMs in FP8 (module docstring)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward_impl(input, weight, *args, **kwargs)


class FP8RowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear with its GEMMs in FP8 (module docstring)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward_impl(input, weight, *args, **kwargs)


class FP8DuplicatedLinear(DuplicatedLinear):
    """mla/linear.py's DuplicatedLinear (MLA's down-projections) with its GEMMs in FP8."""

    def forward(self, x: torch.Tensor):
        if self.skip_bias_add:
            return fp8_linear(x, self.weight), self.bias
        return fp8_linear(x, self.weight, self.bias), None
