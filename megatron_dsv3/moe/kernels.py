"""Triton kernels of the MoE permutation, beside their plain-torch references (dispatch.py uses whichever fits).

Both directions of the token <-> expert-row permutation reduce to two row operations, where `pos` [T*k] gives, for
choice (t, j) (flat index t*k + j), its row in the expert-sorted order (the inverse of DispatchPlan.order):

    sum_rows(src [R, h], pos, w [T, k] | None) -> out [T, h]      out[t] = sum_j w[t, j] * src[pos[t*k + j]]
        the combine's forward (w = gates) and the dispatch permutation's backward (w = None: a plain sum)
    scatter_rows(dout [T, h], pos, w) -> (dsrc [R, h], dw [T, k])  dsrc[pos[t*k + j]] = w[t, j] * dout[t];
                                                                   dw[t, j] = <dout[t], src[pos[t*k + j]]>
        the combine's backward

Each output row is written by exactly one program, with float32 accumulation in registers: no atomics, no float32
copy of [T, k, h] in memory (the references below materialise what the kernels avoid; tests compare them).

And the experts' SwiGLU on the first GEMM's output h1 = [gate | up] [N, 2f] (DeepSeek-V3's FFN):

    swiglu(h1) -> silu(gate) * up [N, f]; its backward recomputes silu from h1 (saved: h1 only, the GEMM's output)
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


# ---- plain-torch references --------------------------------------------------------------------------------------
def sum_rows_reference(src: torch.Tensor, pos: torch.Tensor, T: int, w: Optional[torch.Tensor] = None,
                       chunk: int = 4096) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * src[pos[t*k + j]], float32 (float64 stays) products and sums, in chunks of tokens."""
    k = pos.numel() // T
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    out = torch.empty(T, src.shape[1], dtype=src.dtype, device=src.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        rows = src.index_select(0, pos[a * k:b * k]).view(b - a, k, -1).to(acc_dtype)    # [t, k, h]
        if w is not None:
            rows = rows * w[a:b].to(acc_dtype).unsqueeze(-1)
        out[a:b] = rows.sum(1).to(src.dtype)
    return out


def scatter_rows_reference(dout: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, w: torch.Tensor,
                           chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dsrc [R, h], dw [T, k]) of out = sum_rows(src, pos, w)."""
    T, k = w.shape
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    dsrc = torch.empty_like(src)
    dw = torch.empty(T, k, dtype=acc_dtype, device=src.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        p = pos[a * k:b * k]
        d = dout[a:b].to(acc_dtype).unsqueeze(1)                                           # [t, 1, h]
        dsrc[p] = (d * w[a:b].to(acc_dtype).unsqueeze(-1)).reshape(-1, src.shape[1]).to(src.dtype)
        dw[a:b] = (d * src.index_select(0, p).view(b - a, k, -1).to(acc_dtype)).sum(-1)
    return dsrc, dw


# ---- Triton --------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    @triton.jit
    def _sum_rows_kernel(src_ptr, pos_ptr, w_ptr, out_ptr, H, K: tl.constexpr, HAS_W: tl.constexpr,
                         BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(pos_ptr + t * K + j).to(tl.int64)
            v = tl.load(src_ptr + r * H + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_rows_kernel(dout_ptr, src_ptr, pos_ptr, w_ptr, dsrc_ptr, dw_ptr, H: tl.constexpr,
                             K: tl.constexpr, BLOCK: tl.constexpr):
        # H is constexpr (one compile per hidden size): a runtime loop bound also fails in Triton's interpreter
        # under numpy 2
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            r = tl.load(pos_ptr + t * K + j).to(tl.int64)
            g = tl.load(w_ptr + t * K + j).to(tl.float32)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for h0 in range(0, H, BLOCK):
                offs = h0 + tl.arange(0, BLOCK)
                mask = offs < H
                d = tl.load(dout_ptr + t * H + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(src_ptr + r * H + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dsrc_ptr + r * H + offs, (g * d).to(dsrc_ptr.dtype.element_ty), mask=mask)
                dot += d * v
            tl.store(dw_ptr + t * K + j, tl.sum(dot, axis=0))


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatchers below take the Triton kernels on CUDA only; the `*_triton` functions themselves also run on
    CPU tensors under TRITON_INTERPRET=1 (the test suite sets it on machines without CUDA, so CI checks them)."""
    return HAVE_TRITON and all(t.is_cuda for t in tensors) and tensors[0].dtype != torch.float64


def sum_rows(src: torch.Tensor, pos: torch.Tensor, T: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not use_triton(src, pos):
        return sum_rows_reference(src, pos, T, w)
    return sum_rows_triton(src, pos, T, w)


def sum_rows_triton(src: torch.Tensor, pos: torch.Tensor, T: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    src, pos = src.contiguous(), pos.contiguous()
    H, K = src.shape[1], pos.numel() // T
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T:
        BLOCK = 1024
        _sum_rows_kernel[(T, triton.cdiv(H, BLOCK))](src, pos, w.contiguous() if w is not None else pos, out, H,
                                                     K=K, HAS_W=w is not None, BLOCK=BLOCK)
    return out


def scatter_rows(dout: torch.Tensor, src: torch.Tensor, pos: torch.Tensor,
                 w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(dout, src, pos):
        return scatter_rows_reference(dout, src, pos, w)
    return scatter_rows_triton(dout, src, pos, w)


def scatter_rows_triton(dout: torch.Tensor, src: torch.Tensor, pos: torch.Tensor,
                        w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    T, K = w.shape
    dsrc = torch.empty_like(src)
    dw = torch.empty(T, K, dtype=torch.float32, device=src.device)
    if T:
        _scatter_rows_kernel[(T,)](dout.contiguous(), src.contiguous(), pos.contiguous(), w.contiguous(), dsrc, dw,
                                   src.shape[1], K=K, BLOCK=1024)
    return dsrc, dw


# ---- SwiGLU on [gate | up] ---------------------------------------------------------------------------------------
def swiglu_reference(h1: torch.Tensor) -> torch.Tensor:
    """[N, 2f] -> silu(h1[:, :f]) * h1[:, f:] [N, f] (plain torch; autograd gives its backward)."""
    gate, up = h1.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


if HAVE_TRITON:
    @triton.jit
    def _swiglu_fwd_kernel(h1_ptr, out_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(h1_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h1_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * F + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(h1_ptr, dout_ptr, dh1_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(h1_ptr + row * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h1_ptr + row * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + row * F + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = d * u * s * (1.0 + g * (1.0 - s))          # d silu(g) / dg = s (1 + g (1 - s))
        du = d * g * s
        tl.store(dh1_ptr + row * 2 * F + offs, dg.to(dh1_ptr.dtype.element_ty), mask=mask)
        tl.store(dh1_ptr + row * 2 * F + F + offs, du.to(dh1_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1):
        ctx.save_for_backward(h1)
        N, F2 = h1.shape
        out = torch.empty(N, F2 // 2, dtype=h1.dtype, device=h1.device)
        if N:
            _swiglu_fwd_kernel[(N, triton.cdiv(F2 // 2, 1024))](h1, out, F2 // 2, BLOCK=1024)
        return out

    @staticmethod
    def backward(ctx, dout):
        (h1,) = ctx.saved_tensors
        N, F2 = h1.shape
        dh1 = torch.empty_like(h1)
        if N:
            _swiglu_bwd_kernel[(N, triton.cdiv(F2 // 2, 1024))](h1, dout.contiguous(), dh1, F2 // 2, BLOCK=1024)
        return dh1


def swiglu(h1: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h1 = [gate | up] [N, 2f]: one Triton pass each way on CUDA, the reference elsewhere."""
    if not use_triton(h1) or not h1.is_contiguous():
        return swiglu_reference(h1)
    return _SwiGLU.apply(h1)


def swiglu_triton(h1: torch.Tensor) -> torch.Tensor:
    """The Triton path on any device (CPU tensors under TRITON_INTERPRET=1); h1 contiguous."""
    return _SwiGLU.apply(h1.contiguous())

