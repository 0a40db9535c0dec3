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
        # y = w * x / sqrt(mean(x^2) + eps), statistics in float32 at least (float64 stays float64, so float64
        # references can be exact)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same forward as plain autograd ops (tests differentiate it; it keeps a float32 copy of x for backward)."""
    xs = x if x.dtype == torch.float64 else x.float()
    xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xs.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """rms_norm_reference's forward, bit for bit, keeping only x, the weight and rstd [..., 1] for backward:
    autograd through the plain ops keeps a float32 copy of x (4h bytes a token) and the normalised x (2h) besides
    the input, 6h bytes against 2h + 4 -- at V3 width 57,344 bytes a token per layer for the two RMSNorms (and
    8,192 for MLA's latent norms), measured on the H200 (bench/results.md) as what the norm recompute freed.
    Backward: the RMSNorm gradient in float32 (float64 stays), dx = rstd (gy - x^ mean(gy x^)), gy = g w,
    x^ = x rstd; dw = sum over tokens of g x^ (the unrounded x^: closer to float64 than autograd through the bf16
    forward), one rounding to the weight's dtype. About as many passes over [tokens, h] as autograd's (ten), the
    per-token mean as one GEMV."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xs = x if x.dtype == torch.float64 else x.float()
        rstd = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)              # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xs * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        ct = rstd.dtype                                                        # float32 (float64 for float64 x)
        h = x.shape[-1]
        xhat = (x if x.dtype == ct else x.to(ct)) * rstd                        # [..., h]
        gf = g.to(ct)
        wf = weight.to(ct)
        p = gf * xhat                                                           # [..., h]
        dw = p.reshape(-1, h).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            m = (p @ wf).unsqueeze(-1) / h                                      # mean(gy x^) [..., 1], gy = g w
            dx = (rstd * torch.addcmul(gf * wf, xhat, m, value=-1)).to(x.dtype)
        return dx, dw, None
