"""FP8 GEMMs of the paper's section 3.3 (Figure 6): deq(A) @ deq(B)^T with FP32 accumulation, promoted every 128 of K.

Operands are e4m3 data with float32 dequantisation scales from quant.py (or the Triton quantisers of kernels.py,
bit for bit the same):

    fp8_gemm(a_q [M, K], a_scale [M, K/128], b_q [N, K], b_scale, out_dtype) -> [M, N]
        A in 1x128 tiles; B either in 128x128 blocks (b_scale [N/128, K/128]: a weight, Fprop y = x W^T and Dgrad
        dx = dy W, where B = W^T is W's data transposed with the block scales transposed) or in 1x128 tiles
        (b_scale [N, K/128]: Wgrad dW = dy^T x, both operands column-quantised, stored transposed so that K = tokens).
        The two are told apart by b_scale's shape; they coincide only for N = 1, where they mean the same thing.
    fp8_grouped_gemm(a_q [R, K], a_scale, b_q [E, N, K], b_scale [E, N/128, K/128], offs) -> [R, N]
        the routed experts' Fprop / Dgrad: rows offs[e-1]:offs[e] times expert e's block-quantised weight.
    fp8_grouped_wgrad(dy_qt [N, Rp], dy_st, x_qt [K, Rp], x_st, offs_padded) -> dW [E, N, K]
        the routed experts' Wgrad, dW_e = dy_e^T x_e, contracting over expert e's tokens.

(All "/128" are ceil.) The experts' Wgrad layout: the token dim is the contraction dim, so both operands are
quantised in 128x1 column tiles (quant.quantize_columns_grouped). The tiles restart at each expert's first row and
each expert's tokens are padded with zero columns to a multiple of 128 in the transposed copies: expert e owns
columns offs_padded[e-1]:offs_padded[e] of dy_qt [N, Rp] and x_qt [K, Rp], so no 128-token tile (and no scale)
straddles two experts, each expert's partial last tile is scaled by its own amax, and every per-expert slice is
128-aligned (which the block-scaled cuBLAS GEMM needs). Rp <= R + 127 E.

Where the work runs:
- CUDA: cuBLAS's block-scaled FP8 GEMM through torch._scaled_mm (1x128 x 128x128 and 1x128 x 1x128 scaling; CUDA
  12.9+; 128x128 x 128x128 is refused). torch refuses use_fast_accum with block scales, and cuBLAS promotes each
  128-chunk's partial sum, scaled, into an FP32 accumulator: the paper's N_C = 128. Measured on the H200
  (bench/results_fp8.md, all-positive products): the error is flat in K (5.6e-4 at K = 128, 5.5e-4 at K = 16384)
  as with promotion, where a 14-bit accumulator without promotion grows from 1.2e-4 to 1.0e-2 (truncating) --
  but within a chunk the tensor core's accumulator is narrower than FP32 (an FP32 sum would give 1e-7), exactly
  the paper's split. Operands whose sizes it does not take (_ALIGN) are zero-padded, never truncated.
  The grouped forms loop over experts on the host (the offsets are read once per call; experts whose row counts
  are multiples of 4 go straight into _scaled_mm(out=...)); backend="triton" makes each of them one Triton launch
  with the offsets on the device instead (fp8/grouped_gemm.py; FP8Config.grouped_gemm).
- elsewhere (CPU, float64 outputs, no block-scaled _scaled_mm): the emulation, the same arithmetic written plainly:
  for each 128-wide chunk of K, the float32 product of the e4m3 chunks (exact products) times that chunk's scales,
  added to a float32 accumulator. A float64 out_dtype computes all of it in float64 instead (the exact value of the
  dequantised product, quant.dequantized_matmul).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from megatron_dsv3.fp8.quant import FP8, TILE

# cuBLAS block-scaled GEMM limits, measured on the H200 (torch 2.11+cu130, bench/results_fp8.md): M a multiple of 4
# (1 and 17 are refused: the 1x128 scales' leading dim is M), N a multiple of 16 (_scaled_mm's check), and the
# number of 128-wide K blocks a multiple of 4 -- K = 16..384 (1..3 blocks) came back WRONG without an error (the
# scales' rows are read 16-byte aligned). _scaled_mm_blockwise zero-pads what falls short (zeros add nothing to a
# dot product; padded scales are 1.0), never truncates.
_ALIGN = {"M": 4, "N": 16, "K_BLOCKS": 4}

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_operands(a_q, a_scale, b_q, b_scale) -> str:
    """-> "blocks" | "tiles" (B's scaling); ValueError on anything else."""
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if t.dtype != FP8:
            raise TypeError(f"{name} must be float8_e4m3fn, got {t.dtype}")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"fp8_gemm needs 2-D operands, got a_q {tuple(a_q.shape)}, b_q {tuple(b_q.shape)}")
    (M, K), (N, Kb) = a_q.shape, b_q.shape
    if K != Kb:
        raise ValueError(f"contraction dims differ: a_q {tuple(a_q.shape)}, b_q {tuple(b_q.shape)}")
    T = _cdiv(K, TILE)
    if tuple(a_scale.shape) != (M, T):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; a_q {(M, K)} in 1x{TILE} tiles needs {(M, T)}")
    sb = tuple(b_scale.shape)
    if sb == (N, T):
        return "tiles"                       # for N = 1 also (1, T) = blocks: the same scales, the same product
    if sb == (_cdiv(N, TILE), T):
        return "blocks"
    raise ValueError(f"b_scale has shape {sb}; b_q {(N, K)} needs {(_cdiv(N, TILE), T)} (128x128 blocks) or "
                     f"{(N, T)} (1x128 tiles)")


def _expand_b_scale(b_scale: torch.Tensor, N: int, scaling: str) -> torch.Tensor:
    """-> per-row scales [N, K/128]."""
    return b_scale if scaling == "tiles" else b_scale.repeat_interleave(TILE, 0)[:N]


def fp8_gemm_emulated(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference arithmetic of fp8_gemm (any device): per 128-wide K chunk, the float32 product of the e4m3
    chunks times the chunk's scales, accumulated in float32 (float64 throughout for a float64 out_dtype)."""
    scaling = _check_operands(a_q, a_scale, b_q, b_scale)
    M, K = a_q.shape
    N = b_q.shape[0]
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    sa = a_scale.to(ct)                                              # [M, T]
    sb = _expand_b_scale(b_scale, N, scaling).to(ct)                 # [N, T]
    acc = torch.zeros(M, N, dtype=ct, device=a_q.device)
    for t in range(_cdiv(K, TILE)):
        k = slice(t * TILE, min(K, (t + 1) * TILE))
        part = a_q[:, k].to(ct) @ b_q[:, k].to(ct).T                 # [M, N]: e4m3 products are exact in float32
        acc += part * sa[:, t, None] * sb[None, :, t]                # promotion: scale the chunk, add in FP32
    return acc.to(out_dtype)


# ---- CUDA: cuBLAS block-scaled GEMM --------------------------------------------------------------------------------
def _blockwise_available(t: torch.Tensor) -> bool:
    if not t.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(t.device)
    return major == 9                       # cuBLAS's VEC128 / BLK128x128 scale modes: Hopper (sm_90)


def _pad_rows(x: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    out = torch.full((n, *x.shape[1:]), value, dtype=x.dtype, device=x.device) if value else \
        torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[:x.shape[0]] = x
    return out


def _pad_cols(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[1] == n:
        return x
    out = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    out[:, :x.shape[1]] = x
    return out


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # a column slice of a row-major matrix (the experts' Wgrad operands) goes as it is: cuBLAS takes the leading dim
    ok = x.stride(1) == 1 and x.stride(0) >= x.shape[1] and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
    return x if ok else x.contiguous()


def _row_stride(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [R, C] as a view whose row stride is C rounded up to `multiple`."""
    C = x.shape[1]
    if multiple == 1 or C % multiple == 0:
        return x.contiguous()
    buf = torch.ones(x.shape[0], _round_up(C, multiple), dtype=x.dtype, device=x.device)
    buf[:, :C] = x
    return buf[:, :C]


def _crop(out: torch.Tensor, M: int, N: int) -> torch.Tensor:
    return out if tuple(out.shape) == (M, N) else out[:M, :N].contiguous()


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _pad_scale_cols(s: torch.Tensor, n: int) -> torch.Tensor:
    return s if s.shape[1] == n else torch.nn.functional.pad(s, (0, n - s.shape[1]), value=1.0)


def _scaled_mm_blockwise(a_q, a_scale, b_q, b_scale, scaling: str, out_dtype, out=None) -> torch.Tensor:
    """torch._scaled_mm with A in 1x128 tiles and B in 128x128 blocks or 1x128 tiles; operands padded to _ALIGN.

    Layouts it checks (aten ScaledBlas.cpp): A's scales [M, K/128] outer-dim-major (stride (1, M)); B passed as
    b_q.t() [K, N] (column-major), its scales as the transpose of [N/128, K/128] row-major (blocks) or of [N, K/128]
    outer-dim-major (tiles)."""
    M, K = a_q.shape
    N = b_q.shape[0]
    Tp = _round_up(_cdiv(K, TILE), _ALIGN["K_BLOCKS"])
    Mp, Np, Kp = _round_up(M, _ALIGN["M"]), _round_up(N, _ALIGN["N"]), Tp * TILE
    if Kp != K:
        a_q, b_q = _pad_cols(a_q, Kp), _pad_cols(b_q, Kp)
        a_scale, b_scale = _pad_scale_cols(a_scale, Tp), _pad_scale_cols(b_scale, Tp)
    a_q = _pad_rows(_row_major(a_q), Mp)
    b_q = _pad_rows(_row_major(b_q), Np)
    sa = _pad_rows(a_scale, Mp, 1.0).t().contiguous().t()          # [Mp, Tp], stride (1, Mp): no copy if so already
    if scaling == "tiles":
        sb = _pad_rows(b_scale, Np, 1.0).t().contiguous()          # [Tp, Np]; .t() is [Np, Tp] stride (1, Np)
    else:
        sb = _pad_rows(b_scale, _cdiv(Np, TILE), 1.0).contiguous().t()  # .t() of [Np/128, Tp] row-major
    if out is not None and (Mp, Np) == (M, N) and out.is_contiguous():
        # straight into the caller's buffer (the experts' Wgrad writes each expert's dW in place: no copy)
        return torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False,
                                out=out)
    res = _crop(torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False),
                M, N)
    return res if out is None else out.copy_(res)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """deq(a) @ deq(b).T -> [M, N] out_dtype. a_q [M, K] e4m3 with 1x128 scales [M, ceil(K/128)]; b_q [N, K] e4m3
    with 128x128 scales [ceil(N/128), ceil(K/128)] or 1x128 scales [N, ceil(K/128)] (told apart by shape).
    cuBLAS's block-scaled GEMM on Hopper; the float32 emulation elsewhere and for float64 outputs. `out` ([M, N]
    of out_dtype): written and returned (by cuBLAS itself where no operand needs padding)."""
    scaling = _check_operands(a_q, a_scale, b_q, b_scale)
    if out is not None and (tuple(out.shape) != (a_q.shape[0], b_q.shape[0]) or out.dtype != out_dtype):
        raise ValueError(f"out must be {(a_q.shape[0], b_q.shape[0])} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    if out_dtype == torch.float64 or not _blockwise_available(a_q):
        res = fp8_gemm_emulated(a_q, a_scale, b_q, b_scale, out_dtype)
    elif a_q.shape[0] == 0 or b_q.shape[0] == 0 or a_q.shape[1] == 0:
        res = torch.zeros(a_q.shape[0], b_q.shape[0], dtype=out_dtype, device=a_q.device)
    else:
        return _scaled_mm_blockwise(a_q, a_scale, b_q, b_scale, scaling, out_dtype, out)
    return res if out is None else out.copy_(res)


# ---- the routed experts --------------------------------------------------------------------------------------------
def _group_bounds(offs: torch.Tensor, rows: int, E: int, name: str = "offs") -> Sequence[Tuple[int, int]]:
    if offs.dim() != 1 or offs.numel() != E:
        raise ValueError(f"{name} must be 1-D with one cumulative end per expert ({E}), got shape {tuple(offs.shape)}")
    ends = offs.tolist()                                              # one host sync per call
    starts = [0] + ends[:-1]
    if any(b < a for a, b in zip(starts, ends)) or (ends and ends[-1] > rows):
        raise ValueError(f"{name} must be non-decreasing cumulative ends within {rows} rows, got {ends}")
    return list(zip(starts, ends))


GROUPED_BACKENDS = ("host_loop", "triton")


def _triton_interpreted() -> bool:
    # CPU tensors run Triton kernels only under its interpreter (the CPU test suite sets TRITON_INTERPRET=1)
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp8_grouped_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                     offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                     backend: str = "host_loop", schedule=None) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of a (1x128 tiles: a_q [R, K], a_scale [R, ceil(K/128)]) times deq(b[e]).T, with
    b_q [E, N, K] e4m3 in 128x128 blocks (b_scale [E, ceil(N/128), ceil(K/128)]); offs [E] int32 cumulative ends
    (torch._grouped_mm's convention). -> [R, N]; rows past offs[-1] are zero.
    backend (FP8Config.grouped_gemm) on CUDA: "host_loop" -- one cuBLAS GEMM per expert, offs read on the host --
    or "triton" -- fp8/grouped_gemm.py's one launch, offsets on the device, no host sync (offs not validated;
    schedule: its grouped_gemm.TileSchedule for these offs and rows, made once for several calls, else made here).
    Elsewhere both are the emulation (but "triton" runs the kernel on CPU under TRITON_INTERPRET=1, as the tests do);
    float64 outputs are always the emulation."""
    if b_q.dim() != 3 or b_scale.dim() != 3:
        raise ValueError(f"b_q must be [E, N, K] and b_scale [E, N/128, K/128], got {tuple(b_q.shape)}, "
                         f"{tuple(b_scale.shape)}")
    E, N, K = b_q.shape
    if tuple(b_scale.shape) != (E, _cdiv(N, TILE), _cdiv(K, TILE)):
        raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}; b_q {(E, N, K)} in 128x128 blocks needs "
                         f"{(E, _cdiv(N, TILE), _cdiv(K, TILE))}")
    R = a_q.shape[0]
    if backend not in GROUPED_BACKENDS:
        raise ValueError(f"backend must be one of {GROUPED_BACKENDS}, got {backend!r}")
    if E:
        _check_operands(a_q, a_scale, b_q[0], b_scale[0])
    if backend == "triton" and out_dtype != torch.float64 and (a_q.is_cuda or _triton_interpreted()):
        from megatron_dsv3.fp8.grouped_gemm import fp8_grouped_gemm_triton
        return fp8_grouped_gemm_triton(a_q, a_scale, b_q, b_scale, offs, out_dtype, schedule=schedule)
    out = torch.empty(R, N, dtype=out_dtype, device=a_q.device)
    end = 0
    fast = (out_dtype != torch.float64 and _blockwise_available(a_q) and N % _ALIGN["N"] == 0
            and _cdiv(K, TILE) % _ALIGN["K_BLOCKS"] == 0 and K % TILE == 0)
    for e, (a, b) in enumerate(_group_bounds(offs, R, E)):
        end = b
        if b == a:
            continue
        if fast and (b - a) % _ALIGN["M"] == 0:
            # straight into cuBLAS, writing the output rows in place (the per-expert host cost is what limits
            # small experts: see bench/results_fp8.md)
            sa = a_scale[a:b].t().contiguous().t()
            torch._scaled_mm(a_q[a:b], b_q[e].t(), scale_a=sa, scale_b=b_scale[e].t(), out_dtype=out_dtype,
                             use_fast_accum=False, out=out[a:b])
        else:
            out[a:b] = fp8_gemm(a_q[a:b], a_scale[a:b], b_q[e], b_scale[e], out_dtype)
    out[end:] = 0
    return out


def fp8_grouped_wgrad(dy_qt: torch.Tensor, dy_st: torch.Tensor, x_qt: torch.Tensor, x_st: torch.Tensor,
                      offs_padded: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                      out: Optional[torch.Tensor] = None, backend: str = "host_loop",
                      accumulate: bool = False) -> torch.Tensor:
    """The routed experts' Wgrad: dW[e] = deq(dy_qt[:, g_e]) @ deq(x_qt[:, g_e]).T, g_e = offs_padded[e-1]:
    offs_padded[e], the layout of quant.quantize_columns_grouped (dy_qt [N, Rp], dy_st [N, Rp/128], x_qt [K, Rp],
    x_st [K, Rp/128]; every offs_padded a multiple of 128). -> dW [E, N, K] out_dtype; an expert without tokens
    gets zeros. `out` (an [E, N, K] tensor of out_dtype) is written in place when given. backend as
    fp8_grouped_gemm's: "triton" is fp8/grouped_gemm.py's one launch (offs_padded not read back, not validated).
    accumulate: out += dW instead (out given: the weight-gradient buffer; old + new in FP32, rounded once)."""
    if accumulate and out is None:
        raise ValueError("fp8_grouped_wgrad: accumulate=True needs out (the buffer to add into)")
    if backend not in GROUPED_BACKENDS:
        raise ValueError(f"backend must be one of {GROUPED_BACKENDS}, got {backend!r}")
    if backend == "triton" and out_dtype != torch.float64 and (dy_qt.is_cuda or _triton_interpreted()):
        from megatron_dsv3.fp8.grouped_gemm import fp8_grouped_wgrad_triton
        return fp8_grouped_wgrad_triton(dy_qt, dy_st, x_qt, x_st, offs_padded, out_dtype, out, accumulate=accumulate)
    (N, Rp), (K, Rp2) = dy_qt.shape, x_qt.shape
    if Rp != Rp2 or Rp % TILE:
        raise ValueError(f"dy_qt {tuple(dy_qt.shape)} and x_qt {tuple(x_qt.shape)} need the same token dim, a multiple "
                         f"of {TILE} (quant.quantize_columns_grouped's padded layout)")
    E = offs_padded.numel()
    if out is None:
        out = torch.empty(E, N, K, dtype=out_dtype, device=dy_qt.device)
    elif tuple(out.shape) != (E, N, K) or out.dtype != out_dtype:
        raise ValueError(f"out must be [E, N, K] = {(E, N, K)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    for e, (a, b) in enumerate(_group_bounds(offs_padded, Rp, E, "offs_padded")):
        if a % TILE or b % TILE:
            raise ValueError(f"offs_padded must hold multiples of {TILE}, got {offs_padded.tolist()}")
        if b == a:
            if not accumulate:
                out[e] = 0
            continue
        t = slice(a // TILE, b // TILE)
        if accumulate:            # old + new in FP32 (float64 for a float64 buffer), rounded once to the buffer
            wide = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
            new = fp8_gemm(dy_qt[:, a:b], dy_st[:, t], x_qt[:, a:b], x_st[:, t], wide)
            out[e] = (out[e].to(wide) + new).to(out.dtype)
        else:
            fp8_gemm(dy_qt[:, a:b], dy_st[:, t], x_qt[:, a:b], x_st[:, t], out_dtype, out=out[e])
    return out
