"""A linear layer whose weight is duplicated on every tensor-parallel rank (MLA's down-projections).

The local-backend counterpart of megatron-core's TELinear(parallel_mode="duplicated"): same constructor
keywords, returns (output, bias). Under sequence parallelism each TP rank feeds it its own sequence shard,
so its weight gradient is partial: the weight is marked `sequence_parallel`, which megatron-core's
finalize_model_grads all-reduces over the TP group (as TE does for duplicated linears).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_dsv3.fused_wgrad import fused_wgrad_applies, matmul_fused_wgrad


class DuplicatedLinear(torch.nn.Module):
    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, skip_weight_param_allocation: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name=None, **_):
        super().__init__()
        if skip_weight_param_allocation:
            raise ValueError("DuplicatedLinear always allocates its weight")
        self.skip_bias_add = skip_bias_add
        dtype = config.params_dtype
        # weight [out, in] (torch layout): the same on every TP rank
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=dtype)) if bias else None
        if config.perform_initialization:
            # every TP rank draws the same numbers: the default generator is seeded alike across TP
            with torch.no_grad():
                init_method(self.weight)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)  # TP all-reduce of grads under SP
            p.allreduce = True                                      # and the usual DP reduction

    def forward(self, x: torch.Tensor):
        if self.bias is None and fused_wgrad_applies(self.weight):
            return matmul_fused_wgrad(x, self.weight), None        # weight gradient accumulated by the GEMM
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None
