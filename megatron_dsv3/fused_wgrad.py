"""Linears whose weight gradient the GEMM accumulates in place (megatron-core's gradient_accumulation_fusion, which
needs apex's fused kernel, done with torch's GEMM epilogue instead).

A plain linear's backward allocates a fresh [N, K] weight gradient and AccumulateGrad then adds it into `.grad` (or
megatron's DDP hook adds it into `main_grad`): a transient of the weight's size and a read-read-write pass. For the
output head (V x h = 129280 x 7168, 1.85 GB in bf16) that transient came at the very start of backward, when every
activation is still alive, where a 4-layer V3-width stack peaked on the H200; across the stack's other linears the
adds took ~8 ms of a 179 ms step (profile, bench/results.md). Here the weight-gradient GEMM accumulates straight
into the buffer that holds the gradient (beta = 1: `addmm_`), as megatron-core's fusion does with apex and TE does in
its linears:
  * `main_grad` present (megatron DDP): accumulated into it (float32 main_grad from bf16 operands through torch's
    `addmm(out_dtype=float32)` where the build has it, else a matmul and an add), `grad_added_to_main_grad` set and
    megatron's dummy returned so DDP's hook still fires and skips its add;
  * else `.grad` already there (gradient accumulation, or a benchmark's repeated steps): `.grad.addmm_`;
  * else (first micro-batch): the gradient is returned as usual.
Only when the engine will run the weight's AccumulateGrad in this backward (torch._C._will_engine_execute_node):
an input-gradient-only pass (`torch.autograd.grad(..., inputs=activations)`, DualPipe's B of a split backward)
computes no weight gradient at all and leaves `.grad` alone, so its W pass later counts it exactly once; and that
W pass computes no input gradient (as torch's own ops skip an output the pass does not need).

The routed experts' grouped GEMMs likewise (`grouped_mm_fused_wgrad`, used by moe/experts.py): torch._grouped_mm
has no accumulate-into output, so where a buffer exists the weight gradient is one GEMM per expert with beta = 1
into that expert's slice; the per-expert row counts reach the host by an asynchronous copy started in forward
(waited in backward, long done by then: no stall). Without a buffer it stays one grouped GEMM. The adds this
removes were 2.1 ms of DeepSeekMoE's 17.8 ms of CUDA time on the H200 (bench/results.md, session 4). Those
per-expert GEMMs (K = an expert's ~1k tokens) run at 433-470 TFLOP/s, ~20 ms of the 4-layer stack: `wgrad="quack"`
does them in one launch of quack's Hopper grouped GEMM with accumulation instead (varlen K, beta = 1, no host read):
the default ("auto") for bf16/fp16 buffers where quack imports (accumulate_groups_auto has the measurement).

The classes: FusedWgradColumnParallelLinear / FusedWgradRowParallelLinear are megatron-core's Column/Row parallel
linears (same parameters, init, checkpoint layout) with this matmul on their bias-free paths and megatron's own
tensor-parallel mappings around it (column: the input copy whose backward all-reduces; row: the all-reduce, or the
reduce-scatter under sequence parallelism). A column linear under sequence parallelism keeps megatron-core's path
(its Function re-gathers the input in backward instead of keeping the gathered copy), as does anything with a bias,
gather_output, a weight passed in, expert communication or CPU offloading. OutputHead is the column class (the
model's output layer). mla/linear.py's DuplicatedLinear uses the matmul too.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from megatron.core import tensor_parallel

__all__ = ["OutputHead", "FusedWgradColumnParallelLinear", "FusedWgradRowParallelLinear", "accumulate_wgrad",
           "matmul_fused_wgrad", "fused_wgrad_applies", "grouped_mm_fused_wgrad",
           "accumulate_groups", "accumulate_groups_quack", "accumulate_groups_auto", "HostCounts", "grad_need",
           "wgrad_buffer", "NOT_NEEDED", "ACCUMULATE", "CAPTURED"]


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


NOT_NEEDED, ACCUMULATE, CAPTURED = 0, 1, 2


def grad_need(ctx, i: int) -> int:
    """In a custom autograd Function's backward (ours with a GEMM per gradient: these, FP8Linear, the FP8 experts),
    what this pass does with input i's gradient: NOT_NEEDED (the engine will not run the node it goes
    to: DualPipe's B pass for a weight, its W pass for an activation), ACCUMULATE (it will), or CAPTURED (a leaf
    that torch.autograd.grad(..., inputs=) returns: it must come back as the output, never added into a buffer)."""
    if not ctx.needs_input_grad[i]:
        return NOT_NEEDED
    node = ctx.next_functions[i][0]
    if node is None:
        return NOT_NEEDED
    try:
        return ACCUMULATE if torch._C._will_engine_execute_node(node) else NOT_NEEDED
    except RuntimeError:   # torch refuses the query for a leaf autograd.grad captures
        return CAPTURED


class _FusedWgradMatmul(torch.autograd.Function):
    """x [..., K] @ W^T -> [..., N]; backward: dx = dy W, dW accumulated in place (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t())                                 # [s, b, K] -> [s, b, N]

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        # only what this backward pass will use: DualPipe's B pass wants dx alone, its W pass dW alone
        dx = torch.matmul(dy, weight) if grad_need(ctx, 0) != NOT_NEEDED else None
        g2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])         # [T, N], [T, K]
        return dx, _weight_grad(weight, grad_need(ctx, 1), g2, x2)


def _weight_grad(weight: torch.Tensor, need: int, g2: torch.Tensor, x2: torch.Tensor) -> Optional[torch.Tensor]:
    """dW = g2^T x2 ([N, K] from [T, N], [T, K]) where backward must return it, else accumulated into the weight's
    buffer (module docstring) and None or megatron's dummy returned."""
    if need == NOT_NEEDED:
        return None
    if need == CAPTURED:
        return torch.mm(g2.t(), x2)
    main: Optional[torch.Tensor] = getattr(weight, "main_grad", None)
    if main is not None:
        accumulate_wgrad(main, g2, x2)
        if hasattr(weight, "grad_added_to_main_grad"):
            # megatron DDP's convention (tensor_parallel.layers): a dummy gradient so its hook runs on this
            # thread, and the flag so the hook does not add it
            weight.grad_added_to_main_grad = True
            return torch.empty_like(weight)
        return None
    if weight.grad is not None and weight.grad.dtype == g2.dtype and weight.grad.is_contiguous():
        weight.grad.addmm_(g2.t(), x2)
        return None
    return torch.mm(g2.t(), x2)


def fused_wgrad_applies(weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and weight.requires_grad


def matmul_fused_wgrad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with the weight gradient accumulated in place (module docstring)."""
    return _FusedWgradMatmul.apply(x, weight)


class HostCounts:
    """Per-group row counts on the host without a sync: an asynchronous device->host copy into pinned memory,
    started now (forward) and waited for when read (backward)."""

    def __init__(self, counts: torch.Tensor):
        self.event = None
        if counts.is_cuda:
            self.buf = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self.buf.copy_(counts, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf = counts

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()


def wgrad_buffer(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """Where the weight gradient accumulates: megatron DDP's main_grad, else an existing .grad we can add into."""
    main = getattr(weight, "main_grad", None)
    if main is not None:
        return main
    g = weight.grad
    return g if g is not None and g.is_contiguous() else None


def accumulate_groups(buf: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor,
                      host_counts: HostCounts) -> None:
    """buf[g] [K, M] += x_g^T dy_g for each group's rows (x [N, K], dy [N, M] sorted by group): one GEMM per group
    (cuBLAS, beta = 1), the group sizes read on the host (host_counts, copied there in forward)."""
    start = 0
    for g, n in enumerate(host_counts.get()):
        if n:
            accumulate_wgrad(buf[g], x[start:start + n], dy[start:start + n])       # [K, M] += x_g^T dy_g
        start += n


@lru_cache(maxsize=None)
def quack_gemm_add_inplace():
    """quack's gemm_add_inplace (quack-kernels, which comes with flash-attn-4: bench/fetch_fa4.sh), or None."""
    try:
        from quack.gemm_interface import gemm_add_inplace
    except Exception:   # not installed, or its CUDA libraries missing
        return None
    return gemm_add_inplace


def _quack_for(buf: torch.Tensor):
    return quack_gemm_add_inplace() if buf.is_cuda else None


def accumulate_groups_quack(buf: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor,
                            host_counts: HostCounts) -> None:
    """accumulate_groups' contract in one launch of quack's Hopper grouped GEMM with accumulation (varlen K:
    out[g] = x[:, group g]^T-contraction + out[g], beta = 1): every expert's weight gradient at once, the group
    boundaries read on the device (no host read). Where quack does not import, accumulate_groups."""
    fn = _quack_for(buf)
    if fn is None:
        return accumulate_groups(buf, x, dy, offs, host_counts)
    cu = torch.cat([offs.new_zeros(1), offs]).to(torch.int32)                        # [G + 1] boundaries
    # quack autotunes its tile configuration on a shape's first call (what was measured); under torch's deterministic
    # algorithms its fixed default instead, so that two runs cannot pick different configurations
    fn(x.t(), dy, buf, cu_seqlens_k=cu,
       tuned=not torch.are_deterministic_algorithms_enabled())                        # [G, K, M] += x_g^T dy_g


def accumulate_groups_auto(buf: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor,
                           host_counts: HostCounts) -> None:
    """quack's one launch for a bf16/fp16 buffer where quack imports, else a cuBLAS GEMM per group. Measured on the
    H200 (2026-11-30; 32 experts, 7168 x 4096, ~1k tokens each, bf16 buffer): quack 2.65 ms (uniform) / 2.90
    (skewed) vs per group 3.04 / 3.16; DeepSeekMoE alone 17.74-17.91 ms vs 18.51-18.85. Into a float32 main_grad
    quack took 3.91 / 4.12 ms, and the per-group form there (torch.addmm with out_dtype=float32) is not measured
    against it: that case keeps cuBLAS."""
    if buf.dtype in (torch.bfloat16, torch.float16) and _quack_for(buf) is not None:
        return accumulate_groups_quack(buf, x, dy, offs, host_counts)
    return accumulate_groups(buf, x, dy, offs, host_counts)


WGRAD_GROUPED = {"auto": accumulate_groups_auto, "cublas": accumulate_groups, "quack": accumulate_groups_quack}


class _GroupedMMFusedWgrad(torch.autograd.Function):
    """x [N, K] (rows sorted by group) @ weight[g] [K, M] for each group's rows -> [N, M]; backward: dx one grouped
    GEMM, dW accumulated in place per group where a buffer exists (module docstring), else one grouped GEMM.
    remake_fn(*remake_args): x made again for dW instead of keeping x (its inputs, kept anyway by whoever made x)."""

    @staticmethod
    def forward(ctx, x, weight, offs, host_counts, accumulate, remake_fn, *remake_args):
        ctx.save_for_backward(None if remake_fn else x, weight, offs, *remake_args)
        ctx.host_counts, ctx.remake_fn, ctx.accumulate = host_counts, remake_fn, accumulate
        return torch._grouped_mm(x, weight, offs=offs)                                   # [N, M]

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs, *remake_args = ctx.saved_tensors
        dy = dy.contiguous()
        # only what this backward pass will use: DualPipe's B pass wants dx alone, its W pass dW alone
        dx = torch._grouped_mm(dy, weight.transpose(-2, -1), offs=offs) if grad_need(ctx, 0) != NOT_NEEDED else None
        dw, need_w = None, grad_need(ctx, 1)
        if need_w != NOT_NEEDED:
            if ctx.remake_fn is not None:
                with torch.no_grad():
                    x = ctx.remake_fn(*remake_args)
            buf = wgrad_buffer(weight) if need_w == ACCUMULATE else None
            if buf is None:
                dw = torch._grouped_mm(x.t(), dy, offs=offs)                             # [G, K, M]
            else:
                ctx.accumulate(buf, x, dy, offs, ctx.host_counts)                     # [G, K, M] += x_g^T dy_g
                if buf is not weight.grad and hasattr(weight, "grad_added_to_main_grad"):
                    weight.grad_added_to_main_grad = True     # megatron DDP: its hook runs, skips its add
                    dw = torch.empty_like(weight)
        return (dx, dw, None, None, None, None) + (None,) * len(remake_args)


def grouped_mm_fused_wgrad(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, host_counts: HostCounts,
                           remake=None, wgrad: str = "auto") -> torch.Tensor:
    """torch._grouped_mm(x, weight, offs=offs) with the weight gradient accumulated in place (module docstring).
    x [N, K] rows sorted by group, weight [G, K, M], offs [G] int32 group end offsets, host_counts their sizes.
    remake (fn, *args): fn(*args) gives x again, bit for bit: x is not kept for backward (the experts' SwiGLU
    output, made again from h1 and the gates that the SwiGLU keeps for its own backward). wgrad: how the weight
    gradient is added into its buffer, WGRAD_GROUPED's "cublas" (a GEMM per group), "quack" (one grouped launch) or
    "auto" (quack for a bf16/fp16 buffer where it imports, else cublas: accumulate_groups_auto)."""
    if wgrad not in WGRAD_GROUPED:
        raise ValueError(f"grouped_mm_fused_wgrad: wgrad must be one of {sorted(WGRAD_GROUPED)}, got {wgrad!r}")
    fn, args = (remake[0], remake[1:]) if remake else (None, ())
    return _GroupedMMFusedWgrad.apply(x, weight, offs, host_counts, WGRAD_GROUPED[wgrad], fn, *args)


def _tp_size(module) -> int:
    g = getattr(module, "tp_group", None)
    return g.size() if g is not None else 1


def _plain(module, weight, bias_free: bool) -> bool:
    cfg = module.config
    return (weight is None and bias_free and fused_wgrad_applies(module.weight)
            and not getattr(module, "explicit_expert_comm", False)
            and getattr(cfg, "_cpu_offloading_context", None) is None
            and not getattr(cfg, "delay_wgrad_compute", False)
            and not getattr(cfg, "defer_embedding_wgrad_compute", False))


class FusedWgradColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None,
                **kwargs):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if not _plain(self, weight, self.bias is None) or self.sequence_parallel or gather:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        if _tp_size(self) > 1:      # identity forward, all-reduce of the input gradient backward
            input_ = tensor_parallel.copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return matmul_fused_wgrad(input_, self.weight), None              # [s, b, h] -> [s, b, N/tp]


class FusedWgradRowParallelLinear(tensor_parallel.RowParallelLinear):
    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if args or kwargs or not self.input_is_parallel or not _plain(self, None, self.bias is None):
            return super().forward(input_, *args, **kwargs)
        out = matmul_fused_wgrad(input_, self.weight)                     # [s, b, K/tp] -> [s, b, h] (partial)
        if _tp_size(self) > 1:
            if self.sequence_parallel:
                out = tensor_parallel.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = tensor_parallel.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, None


class OutputHead(FusedWgradColumnParallelLinear):
    """The model's output layer: the column linear above (its weight gradient, 1.85 GB at V3 width, never a
    separate tensor)."""
