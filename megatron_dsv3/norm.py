"""RMSNorm (plain torch), computed in float32 as the published reference does.

Used instead of megatron-core's local `WrappedTorchNorm`, which refuses sequence parallelism and is
what forces megatron-core MoE+TP off the local spec on CPU.
"""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config=None, hidden_size: int = None, eps: float = 1e-6, **_):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        # megatron-core reduces grads of sequence-parallel params across the TP group
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = w * x / sqrt(mean(x^2) + eps), statistics in float32 at least (float64 stays float64,
        # so float64 references can be exact)
        dtype = x.dtype
        xs = x if dtype == torch.float64 else x.float()
        xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xs.to(dtype)
