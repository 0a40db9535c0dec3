"""The output head (logits = h W^T over this rank's vocabulary slice) with its weight gradient accumulated in place.

The head is the largest weight of a DeepSeek-V3 stage (V x h = 129280 x 7168, 1.85 GB in bf16). A plain linear's
backward allocates a fresh [V, h] weight gradient and AccumulateGrad then adds it into `.grad` (or megatron's DDP
hook adds it into `main_grad`): a 1.85 GB transient at the very start of backward, when every activation is still
alive (measured on the H200: that is where a 4-layer V3-width stack peaks), plus a read-read-write pass (~1.3 ms).
Here the weight-gradient GEMM accumulates straight into the buffer that holds the gradient (GEMM epilogue with
beta = 1: `addmm_`), as megatron-core's gradient_accumulation_fusion does with apex's fused kernel and TE does in its
linears:
  * `main_grad` present (megatron DDP): accumulated into it (float32 main_grad from bf16 operands through torch's
    `addmm(out_dtype=float32)` where the build has it, else a matmul and an add), `grad_added_to_main_grad` set and
    megatron's dummy returned so DDP's hook still fires and skips its add;
  * else `.grad` already there (gradient accumulation, or a benchmark's repeated steps): `.grad.addmm_`;
  * else (first micro-batch): the gradient is returned as usual.
Only when the engine will run the weight's AccumulateGrad in this backward (torch._C._will_engine_execute_node):
an input-gradient-only pass (`torch.autograd.grad(..., inputs=activations)`, DualPipe's B of a split backward)
computes no weight gradient at all and leaves `.grad` alone, so its W pass later counts it exactly once.
Tensor parallelism with sequence parallelism, gather_output, or a weight passed in keep megatron-core's own path.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel

__all__ = ["OutputHead", "accumulate_wgrad"]


def accumulate_wgrad(buf: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """buf [N, K] += grad_out[T, N]^T @ inp [T, K], in the GEMM where dtypes allow."""
    if buf.dtype == grad_out.dtype:
        buf.addmm_(grad_out.t(), inp)
        return
    if buf.is_cuda and buf.dtype == torch.float32:
        try:   # bf16/fp16 operands, float32 accumulate-into (torch >= 2.8 on CUDA)
            torch.addmm(buf, grad_out.t(), inp, out_dtype=torch.float32, out=buf)
            return
        except (RuntimeError, TypeError):
            pass
    buf.add_(torch.mm(grad_out.t(), inp).to(buf.dtype))


def _acc_node(weight: torch.Tensor):
    return weight.view_as(weight).grad_fn.next_functions[0][0]          # the weight's AccumulateGrad node


class _HeadMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, acc_node):
        ctx.save_for_backward(x, weight)
        ctx.acc_node = acc_node
        return torch.matmul(x, weight.t())                                 # [s, b, h] -> [s, b, V/tp]

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = torch.matmul(dy, weight) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1] and torch._C._will_engine_execute_node(ctx.acc_node):
            g2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])     # [T, V/tp], [T, h]
            main: Optional[torch.Tensor] = getattr(weight, "main_grad", None)
            if main is not None:
                accumulate_wgrad(main, g2, x2)
                if hasattr(weight, "grad_added_to_main_grad"):
                    # megatron DDP's convention (tensor_parallel.layers): a dummy gradient so its hook runs on this
                    # thread, and the flag so the hook does not add it
                    weight.grad_added_to_main_grad = True
                    dw = torch.empty_like(weight)
            elif weight.grad is not None and weight.grad.dtype == dy.dtype and weight.grad.is_contiguous():
                weight.grad.addmm_(g2.t(), x2)
            else:
                dw = torch.mm(g2.t(), x2)
        return dx, dw, None


class OutputHead(tensor_parallel.ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear (same parameters, init, checkpoint) with the in-place weight-gradient
    accumulation above on its plain path."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None,
                **kwargs):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        plain = (weight is None and self.bias is None and not self.sequence_parallel and not gather
                 and self.output_size_per_partition == self.output_size and torch.is_grad_enabled() and self.weight.requires_grad
                 and not getattr(self.config, "defer_embedding_wgrad_compute", False))
        if not plain:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        # the AccumulateGrad node is looked up per call: autograd makes it on demand and may drop it between steps
        return _HeadMatmul.apply(input_, self.weight, _acc_node(self.weight)), None
