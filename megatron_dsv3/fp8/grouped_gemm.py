"""The routed experts' FP8 GEMM in one Triton launch: DeepGEMM's "contiguous grouped" design, offsets on the device.

    fp8_grouped_gemm_triton(a_q [R, K], a_scale [R, K/128], b_q [E, N, K], b_scale [E, N/128, K/128], offs [E])
        -> out [R, N]: rows offs[e-1]:offs[e] of deq(a) @ deq(b[e])^T; rows past offs[-1] zero.

the same contract as gemm.fp8_grouped_gemm (whose host loop runs one cuBLAS GEMM per expert and reads offs back to
the host every call). Here nothing leaves the device and nothing waits for it:

Schedule. The rows are cut into BM-row tiles expert by expert, so a tile never spans two experts (expert e owns
ceil(n_e / BM) tiles, the last one partial and masked). A few torch ops on the device turn offs into the tiles'
cumulative ends `tile_end [E + 1]` (the extra group is the tail of rows past offs[-1], written as zeros). The grid
is an upper bound known on the host without reading offs -- ceil(R / BM) + E + 1 row tiles (sum_e ceil(n_e / BM)
<= R / BM + E) times ceil(N / BN) column tiles -- and a program past the last tile returns at once. A program finds
its expert with one vector compare: e = #{tile_end <= t}.

Arithmetic (the paper's section 3.3.2, Figure 7b): for each 128-wide K block kb, the tensor core's product of the
e4m3 [BM, 128] tile of A and [BN, 128] tile of B (one K block: one scale per A row, one per B block), then promoted:
acc += partial * a_scale[:, kb] * b_scale[e, n-block, kb] in an FP32 accumulator -- gemm.fp8_gemm_emulated's
order. BN = 128 so each program's columns sit in one 128-row block of B (one scale per K block). Output in out_dtype.

On CPU (Triton's interpreter, the test suite) the e4m3 bytes are decoded to float32 by their bits (exact) and the
partial products are float32 dots (the output cast by torch: the interpreter truncates to bf16); on a GPU tl.dot takes the e4m3 operands directly (wgmma, FP32 accumulate).
fp8_grouped_wgrad_triton is the experts' Wgrad in one launch too (gemm.fp8_grouped_wgrad's contract): grid
(N/128, K/128, E), each program looping over its expert's 128-token blocks of the padded per-expert column layout
(quant.quantize_columns_grouped), both operands scaled per 1x128 token tile; an expert without tokens gets zeros.

`offs` must be non-decreasing within R (torch._grouped_mm's convention); it is not checked (a check would read it
back). tests/fp8/test_grouped_gemm.py: against the emulation and float64, ragged and empty experts, the tail.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron_dsv3.fp8.quant import FP8, TILE

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["fp8_grouped_gemm_triton", "fp8_grouped_wgrad_triton", "tile_schedule", "TileSchedule"]


def _operand(q: torch.Tensor) -> torch.Tensor:
    """The e4m3 operand as the kernels take it: as float8 on a GPU, loaded straight into tl.dot (loaded as bytes and
    bitcast to e4m3 before the dot, the same kernels ran at 290-424 TFLOP/s on the H200 instead of 470-630, the same
    bits: scratch measurement of 2026-11-30 in bench/results_fp8.md); as bytes under the interpreter, which decodes
    them itself."""
    return q if q.is_cuda else q.view(torch.uint8)


DEFAULT_BLOCK_M = 64                  # fp8_grouped_gemm_triton's row tile (its docstring: the measured choice)


class TileSchedule(NamedTuple):
    """tile_schedule's tensors with the (rows, block_m) they were made for: made once per MoE layer and passed to
    its four grouped GEMMs (Fprop x 2, Dgrad x 2 share offs and rows), instead of ~14 small launches each."""
    rows: int
    block_m: int
    starts: torch.Tensor
    ends: torch.Tensor
    tile_end: torch.Tensor

    @classmethod
    def of(cls, offs: torch.Tensor, rows: int, block_m: int = DEFAULT_BLOCK_M) -> "TileSchedule":
        return cls(rows, block_m, *tile_schedule(offs, rows, block_m))


def tile_schedule(offs: torch.Tensor, rows: int, block_m: int):
    """offs [E] cumulative ends -> (starts [E+1], ends [E+1], tile_end [E+1]) int32 on offs' device, no host read:
    group E is the tail rows offs[-1]:rows; group g owns row tiles tile_end[g-1]:tile_end[g]."""
    ends = torch.clamp(offs.to(torch.int32), 0, rows)
    ends = torch.cat([ends, torch.full((1,), rows, dtype=torch.int32, device=offs.device)])
    starts = torch.nn.functional.pad(ends[:-1], (1, 0))
    n = torch.clamp(ends - starts, min=0)
    tile_end = torch.cumsum((n + block_m - 1) // block_m, 0).to(torch.int32)
    return starts, ends, tile_end


if HAVE_TRITON:
    @triton.jit
    def _e4m3_to_f32(u):
        """e4m3fn bytes (uint8) -> float32, exact, by bits (the interpreter's own fp8 handling is unreliable)."""
        u = u.to(tl.int32)
        sign = tl.where((u & 0x80) != 0, -1.0, 1.0)
        e = (u >> 3) & 0xF
        m = u & 0x7
        normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)   # (1 + m/8) 2^(e-7)
        sub = m.to(tl.float32) * 0.001953125                                      # m 2^-9
        v = tl.where(e == 0, sub, normal)
        v = tl.where((u & 0x7F) == 0x7F, float("nan"), v)
        return sign * v

    @triton.jit
    def _grouped_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, starts_ptr, ends_ptr, tile_end_ptr,
                        N, stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bk,
                        stride_bse, stride_bsn, stride_bsk, stride_om,
                        E: tl.constexpr, E_POW2: tl.constexpr, K: tl.constexpr, KT: tl.constexpr,
                        FP8_DOT: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr, NT, NN):
        if GROUP_M == 0:                         # 2-D grid: row tiles fastest, each column tile in turn
            t = tl.program_id(0)
            pid_n = tl.program_id(1)
        else:                                    # 1-D grid in groups of GROUP_M row tiles x every column tile
            pid = tl.program_id(0)
            in_group = GROUP_M * NN
            first = (pid // in_group) * GROUP_M
            size = tl.minimum(NT - first, GROUP_M)
            t = first + (pid % in_group) % size
            pid_n = (pid % in_group) // size
        g_idx = tl.arange(0, E_POW2)
        tile_end = tl.load(tile_end_ptr + g_idx, mask=g_idx <= E, other=2147483647)
        g = tl.sum((tile_end <= t).to(tl.int32), 0)                    # the group (expert, or E: the tail) of tile t
        if g > E:
            return                                                     # past the last tile (the grid is a bound)
        g_end_tile = tl.load(tile_end_ptr + g)
        g_first_tile = tl.load(tile_end_ptr + g - 1, mask=g > 0, other=0)
        row0 = tl.load(starts_ptr + g) + (t - g_first_tile) * BM
        row_end = tl.load(ends_ptr + g)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if g < E:
            e = g.to(tl.int64)
            rows64 = rows.to(tl.int64)
            k = tl.arange(0, BK)
            a_rows = a_ptr + rows64[:, None] * stride_am
            b_rows = b_ptr + e * stride_be + cols[:, None].to(tl.int64) * stride_bn   # [BN, 1]
            for kb in range(KT):
                kk = kb * BK + k
                if EVEN_K:                                              # no K mask: the loads stay plain tiles
                    amask, bmask = rmask[:, None], cmask[:, None]
                else:
                    amask, bmask = rmask[:, None] & (kk < K)[None, :], cmask[:, None] & (kk < K)[None, :]
                if FP8_DOT:                                             # e4m3 x e4m3 on the tensor cores, K-major
                    a = tl.load(a_rows + kk[None, :], mask=amask, other=0.0)                           # [BM, BK]
                    b = tl.load(b_rows + kk[None, :] * stride_bk, mask=bmask, other=0.0)               # [BN, BK]
                    part = tl.dot(a, tl.trans(b))
                else:
                    a = tl.load(a_rows + kk[None, :], mask=amask, other=0)                             # bytes
                    b = tl.load(b_rows + kk[None, :] * stride_bk, mask=bmask, other=0)
                    part = tl.dot(_e4m3_to_f32(a), tl.trans(_e4m3_to_f32(b)), input_precision="ieee")
                sa = tl.load(as_ptr + rows64 * stride_asm + kb * stride_ask, mask=rmask, other=0.0)        # [BM]
                if BN == BK:                                            # one B block: a scalar scale
                    sb = tl.load(bs_ptr + e * stride_bse + pid_n * stride_bsn + kb * stride_bsk)
                    acc += part * sa[:, None] * sb                      # promotion: scale the chunk, add in FP32
                else:                                                   # BN / BK blocks: a scale per column
                    sb = tl.load(bs_ptr + e * stride_bse + (cols // BK) * stride_bsn + kb * stride_bsk,
                                 mask=cmask, other=0.0)                                                # [BN]
                    acc += part * sa[:, None] * sb[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


if HAVE_TRITON:
    @triton.jit
    def _wgrad_block(acc, a_rows, b_rows, as_rows, bs_rows, tb, rmask, cmask, stride_ast, stride_bst,
                     FP8_DOT: tl.constexpr, BK: tl.constexpr):
        """acc += (A[:, tb] B[:, tb]^T) * a_scale[:, tb] b_scale[:, tb]^T for one 128-token block tb."""
        kk = tb.to(tl.int64) * BK + tl.arange(0, BK)
        if FP8_DOT:
            a = tl.load(a_rows + kk[None, :], mask=rmask[:, None], other=0.0)                # [BM, BK] e4m3
            b = tl.load(b_rows + kk[None, :], mask=cmask[:, None], other=0.0)                # [BN, BK]
            part = tl.dot(a, tl.trans(b))
        else:
            a = tl.load(a_rows + kk[None, :], mask=rmask[:, None], other=0)                  # bytes
            b = tl.load(b_rows + kk[None, :], mask=cmask[:, None], other=0)
            part = tl.dot(_e4m3_to_f32(a), tl.trans(_e4m3_to_f32(b)), input_precision="ieee")
        sa = tl.load(as_rows + tb * stride_ast, mask=rmask, other=0.0)
        sb = tl.load(bs_rows + tb * stride_bst, mask=cmask, other=0.0)
        return acc + part * sa[:, None] * sb[None, :]

    @triton.jit
    def _wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, offs_ptr, M, N,
                      stride_am, stride_asm, stride_ast, stride_bn, stride_bsn, stride_bst,
                      stride_oe, stride_om, INTERPRET: tl.constexpr, FP8_DOT: tl.constexpr, ACC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.program_id(2)
        tb0 = tl.load(offs_ptr + e - 1, mask=e > 0, other=0) // BK
        tb1 = tl.load(offs_ptr + e) // BK
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < M
        cmask = cols < N
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
        b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_bn
        as_rows = as_ptr + rows.to(tl.int64) * stride_asm
        bs_rows = bs_ptr + cols.to(tl.int64) * stride_bsn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if INTERPRET:            # the interpreter takes no loop bound loaded from memory in range(); a while loop
            tb = tb0
            while tb < tb1:
                acc = _wgrad_block(acc, a_rows, b_rows, as_rows, bs_rows, tb, rmask, cmask, stride_ast, stride_bst,
                                   FP8_DOT, BK)
                tb += 1
        else:                    # range() over the expert's token blocks: software-pipelined on the GPU
            for tb in range(tb0, tb1):
                acc = _wgrad_block(acc, a_rows, b_rows, as_rows, bs_rows, tb, rmask, cmask, stride_ast, stride_bst,
                                   FP8_DOT, BK)
        out = out_ptr + e.to(tl.int64) * stride_oe + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        if ACC:                  # into the gradient buffer: old + new in FP32, rounded once to its dtype
            acc += tl.load(out, mask=omask, other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)


def fp8_grouped_wgrad_triton(dy_qt: torch.Tensor, dy_st: torch.Tensor, x_qt: torch.Tensor, x_st: torch.Tensor,
                             offs_padded: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                             out: Optional[torch.Tensor] = None, num_warps: Optional[int] = None,
                             num_stages: Optional[int] = None, accumulate: bool = False,
                             block_m: int = TILE, block_n: int = TILE) -> torch.Tensor:
    """gemm.fp8_grouped_wgrad's contract in one launch: dW[e] = deq(dy_qt[:, g_e]) deq(x_qt[:, g_e])^T over expert
    e's 128-padded token columns g_e (quant.quantize_columns_grouped's layout), both operands in 1x128 tiles along
    the tokens. Grid (N/128, K/128, E); each program walks its expert's token blocks, promoting each block's product
    into FP32 with the two operands' scales (gemm.fp8_gemm_emulated's order). offs_padded stays on the device.
    accumulate: out += dW (out given; each element old + new in FP32, rounded once), an expert without tokens
    leaves its slice as it is -- the weight-gradient buffer written by the GEMM, no separate add."""
    if not HAVE_TRITON:
        raise RuntimeError("fp8_grouped_wgrad_triton needs Triton")
    (N, Rp), (K, Rp2) = dy_qt.shape, x_qt.shape
    if dy_qt.dtype != FP8 or x_qt.dtype != FP8:
        raise TypeError(f"dy_qt and x_qt must be float8_e4m3fn, got {dy_qt.dtype}, {x_qt.dtype}")
    if Rp != Rp2 or Rp % TILE or tuple(dy_st.shape) != (N, Rp // TILE) or tuple(x_st.shape) != (K, Rp // TILE):
        raise ValueError(f"dy_qt {tuple(dy_qt.shape)}, dy_st {tuple(dy_st.shape)}, x_qt {tuple(x_qt.shape)}, x_st "
                         f"{tuple(x_st.shape)}: need the same token dim, a multiple of {TILE}, and 1x{TILE} scales")
    E = offs_padded.numel()
    if accumulate and out is None:
        raise ValueError("fp8_grouped_wgrad_triton: accumulate=True needs out (the buffer to add into)")
    if out is None:
        out = torch.empty(E, N, K, dtype=out_dtype, device=dy_qt.device)
    elif tuple(out.shape) != (E, N, K) or out.dtype != out_dtype or out.stride(2) != 1:
        raise ValueError(f"out must be [E, N, K] = {(E, N, K)} {out_dtype} (K contiguous), got {tuple(out.shape)} "
                         f"{out.dtype}")
    if dy_qt.stride(1) != 1:
        dy_qt = dy_qt.contiguous()
    if x_qt.stride(1) != 1:
        x_qt = x_qt.contiguous()
    target = out
    if not dy_qt.is_cuda and out_dtype != torch.float32:     # the interpreter truncates to bf16: torch rounds
        target = (out.float() if accumulate else torch.empty(E, N, K, dtype=torch.float32, device=out.device))
    if E and N and K:
        kw = dict(num_warps=num_warps or 8, num_stages=num_stages or 3) if dy_qt.is_cuda else {}
        _wgrad_kernel[(triton.cdiv(N, block_m), triton.cdiv(K, block_n), E)](
            _operand(dy_qt), dy_st, _operand(x_qt), x_st, target, offs_padded.to(torch.int32),
            N, K, dy_qt.stride(0), dy_st.stride(0), dy_st.stride(1), x_qt.stride(0), x_st.stride(0), x_st.stride(1),
            target.stride(0), target.stride(1), INTERPRET=not dy_qt.is_cuda, FP8_DOT=dy_qt.is_cuda, ACC=accumulate,
            BM=block_m, BN=block_n, BK=TILE, **kw)
    if target is not out:
        out.copy_(target)
    return out


def fp8_grouped_gemm_triton(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                            offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                            block_m: int = DEFAULT_BLOCK_M, num_warps: Optional[int] = None,
                            num_stages: Optional[int] = None, group_m: int = 16, block_n: int = TILE,
                            schedule: Optional[TileSchedule] = None) -> torch.Tensor:
    """gemm.fp8_grouped_gemm's contract in one launch (module docstring). a_scale in any strides (the quantisers'
    (1, R) layout included); b_q [E, N, K] K-major (stride 1 along K); offs [E] int cumulative ends.
    group_m: the programs' order. 0: row tiles fastest for each column tile (a wave of programs shares one B tile
    and streams ~SMs different A tiles: A [R, K] is read once per column tile). g > 0: groups of g row tiles take
    every column tile before the next group (the matmul tutorial's grouping), so a group's A tiles and its expert's B
    stay in L2 (A read ~once, B once per group). The same bits either way.
    Defaults (block_m 64, 4 warps, 4 stages, group_m 16): the fastest of bench_fp8.py's tgrouped configs on the H200
    (2026-11-30: 540-690 TFLOP/s on the DeepSeek-V3 expert shapes, uniform and skewed loads, vs 400-555 for the
    earlier 128 / 8 warps / 3 stages / 2-D order; block_n 256 and block_m 128 slower).
    schedule: TileSchedule.of(offs, R, block_m) made by the caller once for several GEMMs over the same groups."""
    if not HAVE_TRITON:
        raise RuntimeError("fp8_grouped_gemm_triton needs Triton")
    if a_q.dtype != FP8 or b_q.dtype != FP8:
        raise TypeError(f"a_q and b_q must be float8_e4m3fn, got {a_q.dtype}, {b_q.dtype}")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {a_scale.dtype}, {b_scale.dtype}")
    if b_q.dim() != 3 or a_q.dim() != 2:
        raise ValueError(f"a_q must be [R, K] and b_q [E, N, K], got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    E, N, K = b_q.shape
    R = a_q.shape[0]
    KT = triton.cdiv(K, TILE)
    if a_q.shape[1] != K or tuple(a_scale.shape) != (R, KT) or tuple(b_scale.shape) != (E, triton.cdiv(N, TILE), KT):
        raise ValueError(f"shapes do not match: a_q {tuple(a_q.shape)}, a_scale {tuple(a_scale.shape)}, b_q "
                         f"{tuple(b_q.shape)}, b_scale {tuple(b_scale.shape)}")
    if offs.dim() != 1 or offs.numel() != E:
        raise ValueError(f"offs must be 1-D with one cumulative end per expert ({E}), got shape {tuple(offs.shape)}")
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if b_q.stride(2) != 1:
        b_q = b_q.contiguous()
    # Triton's interpreter truncates its float32 -> bf16 cast (a GPU rounds to nearest even): on CPU the kernel writes
    # float32 and torch rounds it
    kdt = out_dtype if a_q.is_cuda else torch.float32
    out = torch.empty(R, N, dtype=kdt, device=a_q.device)
    if R == 0 or N == 0:
        return out.to(out_dtype)
    if block_n % TILE or block_m % 16:
        raise ValueError(f"block_n must be a multiple of {TILE} and block_m of 16, got {block_n}, {block_m}")
    bm, bn = block_m, block_n
    if schedule is None:
        starts, ends, tile_end = tile_schedule(offs, R, bm)
    elif (schedule.rows, schedule.block_m) != (R, bm):
        raise ValueError(f"schedule was made for {schedule.rows} rows in tiles of {schedule.block_m}, this GEMM has "
                         f"{R} rows in tiles of {bm}")
    else:
        starts, ends, tile_end = schedule.starts, schedule.ends, schedule.tile_end
    NT, NN = triton.cdiv(R, bm) + E + 1, triton.cdiv(N, bn)
    if group_m < 0:
        raise ValueError(f"group_m must be >= 0, got {group_m}")
    grid = (NT, NN) if group_m == 0 else (NT * NN,)
    kw = {}
    if a_q.is_cuda:
        kw = dict(num_warps=num_warps or (8 if bm * bn >= 128 * 128 else 4), num_stages=num_stages or 4)
    _grouped_kernel[grid](
        _operand(a_q), a_scale, _operand(b_q), b_scale, out, starts, ends, tile_end,
        N, a_q.stride(0), a_scale.stride(0), a_scale.stride(1), b_q.stride(0), b_q.stride(1), b_q.stride(2),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        E=E, E_POW2=triton.next_power_of_2(E + 1), K=K, KT=KT, FP8_DOT=a_q.is_cuda, EVEN_K=K % TILE == 0,
        BM=bm, BN=bn, BK=TILE, GROUP_M=group_m, NT=NT, NN=NN, **kw)
    return out.to(out_dtype)
