"""Triton kernels of the MoE permutation and the experts' SwiGLU, beside their plain-torch references.

Both directions of the token <-> expert-row permutation are one row operation and a gather, where `pos` [T*k] gives,
for choice (t, j) (flat index t*k + j), its row in the expert-sorted order (the inverse of DispatchPlan.order):

    sum_rows(src [R, h], pos, T) -> out [T, h]      out[t] = sum_j src[pos[t*k + j]]
        the (unweighted) combine's forward and the dispatch permutation's backward; their other directions are
        gathers (index_select)

Each output row is written by exactly one program, with float32 accumulation in registers: no atomics, no float32
copy of [T, k, h] in memory (the reference below materialises what the kernel avoids; tests compare them).

And the experts' SwiGLU on the first GEMM's output h1 = [gate | up] [N, 2f] (DeepSeek-V3's FFN), each row scaled by
its gate g (so the down-projection computes g * FFN(x) and the combine is a plain sum: sum_j g_j (a_j W2) =
sum_j (g_j a_j) W2):

    swiglu(h1, g) -> g[:, None] * silu(gate) * up [N, f]; its backward recomputes silu from h1 (saved: h1 and g)
                     and gives dg_n = <dout_n, silu(gate_n) * up_n> as one float32 dot per row
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines: the torch references are used
    HAVE_TRITON = False


# ---- plain-torch reference ---------------------------------------------------------------------------------------
def sum_rows_reference(src: torch.Tensor, pos: torch.Tensor, T: int, chunk: int = 4096) -> torch.Tensor:
    """out[t] = sum_j src[pos[t*k + j]], float32 (float64 stays) sums, in chunks of tokens."""
    k = pos.numel() // T if T else 0
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    out = torch.empty(T, src.shape[1], dtype=src.dtype, device=src.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        rows = src.index_select(0, pos[a * k:b * k]).view(b - a, k, -1).to(acc_dtype)    # [t, k, h]
        out[a:b] = rows.sum(1).to(src.dtype)
    return out


# ---- Triton --------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    @triton.jit
    def _sum_rows_kernel(src_ptr, pos_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(pos_ptr + t * K + j).to(tl.int64)
            acc += tl.load(src_ptr + r * H + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatchers below take the Triton kernels on CUDA only; the `*_triton` functions themselves also run on
    CPU tensors under TRITON_INTERPRET=1 (the test suite sets it on machines without CUDA, so CI checks them)."""
    return HAVE_TRITON and all(t.is_cuda for t in tensors) and tensors[0].dtype != torch.float64


def sum_rows(src: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
    if not use_triton(src, pos):
        return sum_rows_reference(src, pos, T)
    return sum_rows_triton(src, pos, T)


def sum_rows_triton(src: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
    src, pos = src.contiguous(), pos.contiguous()
    H = src.shape[1]
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T:
        BLOCK = 1024
        _sum_rows_kernel[(T, triton.cdiv(H, BLOCK))](src, pos, out, H, K=pos.numel() // T, BLOCK=BLOCK)
    return out


# ---- SwiGLU on [gate | up], each row scaled by its gate -------------------------------------------------------------
def swiglu_reference(h1: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, 2f] -> s_n * silu(h1[:, :f]) * h1[:, f:] [N, f] (plain torch; autograd gives its backward). row_scale
    s [N] (float32, the rows' gates) or None (s = 1); products in float32 (float64 stays), one rounding to h1's
    dtype."""
    acc = torch.promote_types(h1.dtype, torch.float32)
    gate, up = h1.to(acc).chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up
    if row_scale is not None:
        a = a * row_scale.to(acc).unsqueeze(-1)
    return a.to(h1.dtype)


def _swiglu_torch_forward(h1: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return swiglu_reference(h1, row_scale)


def _swiglu_torch_backward(h1: torch.Tensor, row_scale: Optional[torch.Tensor],
                           dout: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dh1 [N, 2f] in h1's dtype, ds [N] float32 or None) of out = s * silu(gate) * up, from h1 and s alone."""
    acc = torch.promote_types(h1.dtype, torch.float32)
    gate, up = h1.to(acc).chunk(2, dim=-1)
    d = dout.to(acc)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    ds = None
    if row_scale is not None:
        ds = (d * silu * up).sum(-1).to(torch.promote_types(row_scale.dtype, torch.float32))   # <dout, a>
        d = d * row_scale.to(acc).unsqueeze(-1)
    dh1 = torch.cat([d * up * sig * (1 + gate * (1 - sig)), d * silu], dim=-1)
    return dh1.to(h1.dtype), ds


if HAVE_TRITON:
    @triton.jit
    def _swiglu_fwd_kernel(h1_ptr, s_ptr, out_ptr, F, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(h1_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h1_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        if HAS_S:
            a = a * tl.load(s_ptr + row).to(tl.float32)
        tl.store(out_ptr + row * F + offs, a.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(h1_ptr, s_ptr, dout_ptr, dh1_ptr, ds_ptr, F, NB, HAS_S: tl.constexpr,
                           BLOCK: tl.constexpr):
        # ds: one float32 partial dot <dout, silu(gate) * up> per (row, block), summed over the blocks after
        # (deterministic, no atomics)
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(h1_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h1_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + row * F + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        if HAS_S:
            tl.store(ds_ptr + row * NB + blk, tl.sum(d * g * s * u, axis=0))
            d = d * tl.load(s_ptr + row).to(tl.float32)
        dg = d * u * s * (1.0 + g * (1.0 - s))          # d silu(g) / dg = s (1 + g (1 - s))
        du = d * g * s
        tl.store(dh1_ptr + row * 2 * F + offs, dg.to(dh1_ptr.dtype.element_ty), mask=mask)
        tl.store(dh1_ptr + row * 2 * F + F + offs, du.to(dh1_ptr.dtype.element_ty), mask=mask)


def _swiglu_triton_forward(h1: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    N, F2 = h1.shape
    out = torch.empty(N, F2 // 2, dtype=h1.dtype, device=h1.device)
    if N:
        s = row_scale.contiguous() if row_scale is not None else h1
        _swiglu_fwd_kernel[(N, triton.cdiv(F2 // 2, 1024))](h1, s, out, F2 // 2, HAS_S=row_scale is not None,
                                                           BLOCK=1024)
    return out


def _swiglu_triton_backward(h1: torch.Tensor, row_scale: Optional[torch.Tensor],
                            dout: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, F2 = h1.shape
    nb = triton.cdiv(F2 // 2, 1024)
    dh1 = torch.empty_like(h1)
    ds = None if row_scale is None else torch.zeros(N, nb, dtype=torch.float32, device=h1.device)
    if N:
        s = row_scale.contiguous() if row_scale is not None else h1
        _swiglu_bwd_kernel[(N, nb)](h1, s, dout.contiguous(), dh1, ds if ds is not None else h1, F2 // 2, nb,
                                    HAS_S=row_scale is not None, BLOCK=1024)
    return dh1, (None if ds is None else ds.sum(1))


class _SwiGLU(torch.autograd.Function):
    """out = s * silu(gate) * up, saving h1 and s only; the backward recomputes silu and gives ds = <dout, a>
    (a = silu(gate) * up) as one float32 dot per row. Triton kernels (triton=True) or the torch formulas."""

    @staticmethod
    def forward(ctx, h1, row_scale, triton_path: bool):
        ctx.save_for_backward(h1, row_scale)
        ctx.triton_path = triton_path
        fwd = _swiglu_triton_forward if triton_path else _swiglu_torch_forward
        return fwd(h1, row_scale)

    @staticmethod
    def backward(ctx, dout):
        h1, row_scale = ctx.saved_tensors
        bwd = _swiglu_triton_backward if ctx.triton_path else _swiglu_torch_backward
        dh1, ds = bwd(h1, row_scale, dout)
        if ds is not None and row_scale is not None:
            ds = ds.to(row_scale.dtype)
        return dh1, ds, None


def swiglu(h1: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """row_scale[:, None] * silu(gate) * up of h1 = [gate | up] [N, 2f] (row_scale [N] float32, the rows' gates, or
    None): one Triton pass each way on CUDA, the same Function over torch formulas elsewhere; keeps h1 and row_scale
    only. Gradients: dh1 in h1's dtype, d row_scale in float32."""
    triton_path = use_triton(h1) and h1.is_contiguous()
    return _SwiGLU.apply(h1, row_scale, triton_path)


def swiglu_forward(h1: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """swiglu's forward alone, no autograd: the same kernel and bits as swiglu(h1, row_scale) (for remaking its
    output in backward instead of keeping it)."""
    fwd = _swiglu_triton_forward if use_triton(h1) and h1.is_contiguous() else _swiglu_torch_forward
    return fwd(h1, row_scale)


def swiglu_triton(h1: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton path on any device (CPU tensors under TRITON_INTERPRET=1)."""
    return _SwiGLU.apply(h1.contiguous(), row_scale, True)
