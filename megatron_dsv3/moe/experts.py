"""The routed experts of one EP rank: E_local SwiGLU MLPs computed as one grouped computation.

Layout (per EP rank; local expert e is global expert ep_rank * E_local + e):
    weight1 [E_local, h, 2f]   x @ weight1[e] = [gate | up]   (HF gate_proj.weight = weight1[e, :, :f].T,
                                                               up_proj.weight = weight1[e, :, f:].T)
    weight2 [E_local, f, h]    (HF down_proj.weight = weight2[e].T)
Tokens arrive sorted by local expert with `counts` [E_local] tokens each, and with their gates g [N] (row_scale):
each row's output is g * SwiGLU(x W1) W2, the gate applied to the SwiGLU output before the down-projection
(moe/dispatch.py says why; kernels.swiglu fuses it and returns dg). Fast path: torch._grouped_mm (CUDA,
bf16, 16-byte aligned rows); elsewhere a padded batched matmul ([E_local, max count, h] @ [E_local, h, 2f]).
`experts_loop_reference` is the plain per-expert loop both are tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.fused_wgrad import HostCounts, grouped_mm_fused_wgrad
from megatron_dsv3.moe.kernels import swiglu, swiglu_forward

__all__ = ["GroupedExperts", "grouped_swiglu", "padded_swiglu", "experts_loop_reference", "can_use_grouped_mm"]


def experts_loop_reference(x: torch.Tensor, counts: Sequence[int], weight1: torch.Tensor,
                           weight2: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain reference: one SwiGLU per expert over its contiguous block of tokens, each output row times its
    row_scale (None: 1). x [N, h] -> [N, h]."""
    outs, start = [], 0
    for e, n in enumerate(int(c) for c in counts):
        gate, up = (x[start:start + n] @ weight1[e]).chunk(2, dim=-1)                 # [n, f] each
        y = (F.silu(gate) * up) @ weight2[e]                                           # [n, h]
        outs.append(y if row_scale is None else y * row_scale[start:start + n, None].to(y.dtype))
        start += n
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, weight2.shape[-1])


def can_use_grouped_mm(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor) -> bool:
    """torch._grouped_mm is used on CUDA for bf16 with row strides that are multiples of 16 bytes (8 elements)."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and weight1.dtype == torch.bfloat16 and weight2.dtype == torch.bfloat16
            and all(d % 8 == 0 for d in (weight1.shape[1], weight1.shape[2], weight2.shape[1], weight2.shape[2])))


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   row_scale: Optional[torch.Tensor] = None, fuse_wgrad: bool = True, wgrad: str = "auto"
                   ) -> torch.Tensor:
    """torch._grouped_mm path: x [N, h] sorted by expert, counts [E_local] (on x's device), row_scale [N] -> [N, h].
    fuse_wgrad: the weight gradients accumulated in place by per-expert GEMMs where a buffer exists
    (fused_wgrad.grouped_mm_fused_wgrad), and the SwiGLU output made again for dW2 instead of kept (k * f * 2 bytes
    a token); False: autograd through torch._grouped_mm (a fresh [E, ...] gradient that AccumulateGrad or
    megatron's DDP hook then adds; the SwiGLU output kept). wgrad: the fused weight gradients' GEMMs, "cublas" (one
    per expert), "quack" (one grouped launch; fused_wgrad.accumulate_groups_quack) or "auto" (quack for a bf16/fp16
    gradient buffer where it imports, else cublas; fused_wgrad.accumulate_groups_auto has the measurement)."""
    offs = torch.cumsum(counts, dim=0).to(torch.int32)                                 # group end offsets
    if fuse_wgrad and torch.is_grad_enabled() and weight1.requires_grad and weight2.requires_grad:
        host = HostCounts(counts)
        h1 = grouped_mm_fused_wgrad(x, weight1, offs, host, wgrad=wgrad)                # [N, 2f] = [gate | up]
        a = swiglu(h1, row_scale)                                                       # [N, f], keeps h1 and g
        # a is not kept: dW2 makes it again from h1 and g (as the paper recomputes the SwiGLU output)
        return grouped_mm_fused_wgrad(a, weight2, offs, host, remake=(swiglu_forward, h1, row_scale),
                                      wgrad=wgrad)                                      # [N, h]
    h1 = torch._grouped_mm(x, weight1, offs=offs)                                      # [N, 2f] = [gate | up]
    return torch._grouped_mm(swiglu(h1, row_scale), weight2, offs=offs)                # [N, h]


def padded_swiglu(x: torch.Tensor, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                  row_scale: Optional[torch.Tensor] = None, max_count: Optional[int] = None) -> torch.Tensor:
    """Batched path for any device/dtype: scatter into [E_local, C, h] (C = largest count), two bmm's, gather.
    Padding rows are zero (scale 0), so they produce zero output and zero gradient."""
    N, h = x.shape
    E = weight1.shape[0]
    if N == 0:
        # keep the graph: DDP wants the weights' (zero) gradients, and the dispatch all-to-all's backward is a
        # collective that must run on every EP rank, also on one that received no token ([0, h] from x)
        out = 0 * x + 0 * (weight1.sum() + weight2.sum())
        return out if row_scale is None else out + 0 * row_scale.sum()
    C = int(counts.max()) if max_count is None else max_count
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=N)        # [N]
    starts = torch.cumsum(counts, dim=0) - counts                                                       # [E]
    pos = torch.arange(N, device=x.device) - starts[expert]                                            # [N]
    padded = x.new_zeros(E, C, h).index_put((expert, pos), x)                                          # [E, C, h]
    h1 = torch.bmm(padded, weight1)                                                                     # [E, C, 2f]
    s = None
    if row_scale is not None:
        s = row_scale.new_zeros(E, C).index_put((expert, pos), row_scale).view(E * C)                  # [E*C]
    a = swiglu(h1.view(E * C, -1), s).view(E, C, -1)                                                   # [E, C, f]
    out = torch.bmm(a, weight2)                                                                         # [E, C, h]
    return out[expert, pos]                                                                             # [N, h]


class GroupedExperts(MegatronModule):
    """E_local SwiGLU experts (weights as in the module docstring); forward(x_sorted [N, h], counts [E_local]).
    fuse_wgrad (grouped path): the weight gradients accumulated in place by the GEMMs (grouped_swiglu); wgrad: their
    GEMMs, "auto" (default: quack's one grouped launch for a bf16/fp16 buffer where quack imports, else one cuBLAS
    GEMM per expert), "cublas" or "quack" (grouped_swiglu)."""

    fuse_wgrad = True
    wgrad = "auto"

    def __init__(self, config, num_local_experts: int, ffn_hidden_size: int, ep_rank: int = 0, ep_size: int = 1,
                 pg_collection=None):
        super().__init__(config=config)
        self.num_local_experts, self.ffn_hidden_size = num_local_experts, ffn_hidden_size
        self.ep_rank, self.ep_size = ep_rank, ep_size
        # the ranks holding the same experts (expert-tensor- and expert-data-parallel): the checkpoint's replica_id
        self.expt_tp_group = getattr(pg_collection, "expt_tp", None)
        self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
        h, f, E = config.hidden_size, ffn_hidden_size, num_local_experts
        device = "cpu" if config.use_cpu_initialization else None
        dtype = config.params_dtype
        self.weight1 = torch.nn.Parameter(torch.empty(E, h, 2 * f, dtype=dtype, device=device))
        self.weight2 = torch.nn.Parameter(torch.empty(E, f, h, dtype=dtype, device=device))
        if config.perform_initialization:
            self._init_weights(config)
        for w in (self.weight1, self.weight2):
            # expert parameters for megatron's DDP/optimizer: their grads are summed over the expert-data-parallel
            # group (which, with ETP = 1, also spans the TP ranks) and scaled by 1/dp. Also at EP = 1: with TP > 1
            # each TP rank computes only its share of the tokens (layer.py), so the TP ranks' grads must be summed.
            setattr(w, "allreduce", False)

    @torch.no_grad()
    def _init_weights(self, config) -> None:
        """N(0, init_method_std) for weight1 and megatron's output_layer_init_method for weight2, drawn per
        GLOBAL expert from a generator seeded by (one draw of the global RNG, expert id): every rank builds the
        same layer in the same order, so the experts are the same whatever the EP size, and differ across layers."""
        base = int(torch.randint(0, 2 ** 62, (1,)).item())
        for e in range(self.num_local_experts):
            g = self.ep_rank * self.num_local_experts + e
            fork = torch.random.fork_rng(devices=[])
            with fork:
                torch.manual_seed(base + g)
                w1 = torch.empty(self.weight1.shape[1:], dtype=torch.float32)
                w2 = torch.empty(self.weight2.shape[1:], dtype=torch.float32)
                config.init_method(w1)
                config.output_layer_init_method(w2)
            self.weight1[e].copy_(w1)
            self.weight2[e].copy_(w2)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, h] sorted by local expert, counts [E_local], row_scale [N] (the rows' gates) -> [N, h]."""
        return self.expert_mlp(x, counts, self.weight1, self.weight2, row_scale)

    def expert_mlp(self, x: torch.Tensor, counts: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """THE expert GEMM hook: (row_scale * SwiGLU(x @ weight1[e])) @ weight2[e] per expert block (row_scale [N]
        float32 or None). A subclass replaces this one method to change the GEMMs' precision (the FP8 experts) and
        nothing else."""
        if can_use_grouped_mm(x, weight1, weight2):
            return grouped_swiglu(x, counts, weight1, weight2, row_scale, fuse_wgrad=self.fuse_wgrad,
                                  wgrad=self.wgrad)
        return padded_swiglu(x, counts, weight1, weight2, row_scale)

    @staticmethod
    def _group_rank(group, name: str) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0
        if group is None:
            if torch.distributed.get_world_size() == 1:
                return 0
            raise ValueError(f"GroupedExperts.sharded_state_dict needs the {name} process group to mark replicas: "
                             f"build it (DeepSeekMoE) with a pg_collection that has {name}")
        return torch.distributed.get_rank(group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed checkpointing: both weights are sharded on dim 0 over EP (global expert index); the copies
        on the expert-tensor- and expert-data-parallel ranks (groups of the pg_collection) are replicas."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        replica_id = (0, self._group_rank(self.expt_tp_group, "expt_tp"),
                      self._group_rank(self.expt_dp_group, "expt_dp"))
        out = {}
        for name in ("weight1", "weight2"):
            t = getattr(self, name)
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", t, *sharded_offsets, (len(sharded_offsets), self.ep_rank, self.ep_size),
                replica_id=replica_id, prepend_axis_num=len(sharded_offsets))
        return out
