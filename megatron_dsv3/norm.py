"""RMSNorm, computed in float32 as the published reference does: y = w * (x / sqrt(mean(x^2) + eps)), the
normalised x rounded to x's dtype before the weight multiplies it.

Used instead of megatron-core's local `WrappedTorchNorm`, which refuses sequence parallelism and is
what forces megatron-core MoE+TP off the local spec on CPU.

Two implementations with one contract, both keeping only x and rstd [..., 1] (float32) for backward:
- `_RMSNormFunction`: torch ops (CPU, float64, anything the kernels do not take);
- `_RMSNormTriton`: one Triton pass each way on CUDA (forward: a row per program; backward: blocks of rows per
  program, dx per row and the weight gradient accumulated per program, then summed).
`rms_norm_reference` is the plain autograd form the tests differentiate.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines: the torch Function is used
    HAVE_TRITON = False


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
        if use_triton(x, self.weight):
            return _RMSNormTriton.apply(x, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.numel() > 0)


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


# ---- Triton ---------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)            # rounded as the reference's .to(dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dw_ptr, T, H, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
        # rows pid*ROWS .. +ROWS; dw_ptr [programs, H] float32 partial sums (summed after, deterministic)
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            ok = row < T
            r64 = row.to(tl.int64)
            m = mask & ok
            x = tl.load(x_ptr + r64 * H + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + r64 * H + offs, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=ok, other=0.0)
            xhat = x * rstd
            p = g * xhat
            dw += p
            mean = tl.sum(p * w, axis=0) / H                                   # mean(gy x^), gy = g w
            dx = rstd * (g * w - xhat * mean)
            tl.store(dx_ptr + r64 * H + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + pid.to(tl.int64) * H + offs, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().reshape(-1, x.shape[-1])


class _RMSNormTriton(torch.autograd.Function):
    """_RMSNormFunction's contract in one Triton pass each way (x and rstd kept; rstd's sum in another order than
    torch's mean, so values within an ulp of the torch Function's, not bit for bit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        T, H = x2.shape
        out = torch.empty(T, H, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(T, 1, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(H)
        kw = {"num_warps": min(16, max(1, block // 512))} if x.is_cuda else {}
        _rms_fwd_kernel[(T,)](x2, weight.contiguous(), out, rstd, H, eps, BLOCK=block, **kw)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], H)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        T, H = x2.shape
        g2 = _rows(g)
        dx = torch.empty(T, H, dtype=x2.dtype, device=x2.device)
        block = triton.next_power_of_2(H)
        progs = min(T, 4 * (torch.cuda.get_device_properties(x2.device).multi_processor_count
                            if x2.is_cuda else 2))
        rows = triton.cdiv(T, progs)
        progs = triton.cdiv(T, rows)
        dw = torch.empty(progs, H, dtype=torch.float32, device=x2.device)
        kw = {"num_warps": min(16, max(1, block // 512))} if x2.is_cuda else {}
        _rms_bwd_kernel[(progs,)](x2, weight.contiguous(), g2, rstd, dx, dw, T, H, ROWS=rows, BLOCK=block, **kw)
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton path on any device (CPU tensors under TRITON_INTERPRET=1, as the tests run it)."""
    return _RMSNormTriton.apply(x, weight, eps)
