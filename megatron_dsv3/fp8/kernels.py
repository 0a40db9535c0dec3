"""Triton versions of quant.py's quantisers, bit for bit the same bytes and scales (tests/fp8/test_kernels.py).

Activations (1x128 tiles along K, and 128x1 tiles along M for Wgrad), two kernels:
- _rows_kernel: the 1x128 tiles of [BM, 128] blocks, q [M, K] and s [M, ceil(K/128)] (quant.quantize_tiles);
- _cols_kernel: the 128x1 tiles of [128, BKC] strips, stored transposed: qt [K, M'] and st [K, M'/128]
  (quant.quantize_tiles of x.t()). GROUPED: row tile j reads rows src[j] : src[j] + cnt[j] of x and writes padded
  columns 128 j : 128 (j + 1) of qt, zeros past cnt[j] -- quant.quantize_columns_grouped's per-expert layout, the
  tiles restarting at each expert's first row.
quantize_tiles_and_transpose runs both, reading x twice: a fused kernel holding a [128, 128] float32 tile needed
~185 registers a thread (8 warps per SM on an H200, too few loads in flight) and was 2.1x slower than the two
small, fully occupied ones (bf16 16384 x 7168 on an H200: 638 vs 305 us) although it moves 4 bytes per element,
not 6. A second fused form (2026-11-30: the [128, 128] block held in bf16, each direction converting it again,
_qdiv both ways, the transposed store through tl.trans; bit-exact) was still slower: 460 / 524 / 651 us at 4 / 8 /
16 warps against 308 (32768 x 2048: 268 against 180; 4096 x 7168: 126 against 92), so it was not kept. The strip
widths and warps (32 wide for it, 64 for the grouped layout, 2 warps) are what measured fastest. A third form
(2026-11-30, removed): one kernel reading each [128, 128] block twice in row chunks (the second time from L2),
bit-exact but slower at every setting on an H200: bf16 4096 x 7168 131 / 158 / 231 us in chunks of 64 / 32 / 16
rows (4 warps; 8 slower still) against the two kernels' 84 us (1391 GB/s, 36% of the 3.8 TB/s copy); 32768 x 2048
284 us at best. The column kernel's two-pass form over wider strips (row chunks read twice, amax then bytes) lost
too: grouped 32768 x 2048 136 us at best (64-row chunks, strip 128, 2 warps; others 186-764) against 128 us
(1568 GB/s, 39%), 4096 x 7168 103 against 103 (others 142-598), so only the single-pass [128, 64] strip is kept.

A second kernel quantises weights in 128x128 blocks (quant.quantize_blocks; a stack of experts' weights in one
launch), optionally writing the transposed blocks (Dgrad's copy) from the same read. A third dequantises 1x128
tiles (quant.dequantize_tiles) in one pass: the reference's float32 temporaries of [M, K] (4 passes) are what the
FP8 experts paid for their dispatched input and their SwiGLU input in backward.

The arithmetic is quant.py's, in its order: float32, amax (NaN-propagating), scale = amax / 448 rounded to nearest
(div_rn), pow2 rounding up by exponent bits (exact, subnormals included), zero tile -> 1.0, underflow -> 2^-149,
x / scale rounded to nearest, clamp to +-448 (NaN kept), round-to-nearest-even cast to e4m3: the hardware's
cvt.rn.satfinite on a GPU, the same rule written out in integer ops elsewhere (Triton's interpreter mis-rounds
its own fp8 cast; the CPU tests check the integer form, the GPU tests the hardware one). The column kernel gets
x / scale without a division per element (_qdiv: a reciprocal per scale, then a multiply and a correction, the same
correctly rounded quotient): div_rn is a MUFU reciprocal plus a check and a call to a slow path on a GPU. The row
kernel keeps div_rn: it is at ~73% of a copy's bandwidth, and _qdiv made it ~4% slower there.

The `*_triton` functions run wherever Triton does (CPU tensors under TRITON_INTERPRET=1: the CPU test suite);
the `*_fast` dispatchers take them on CUDA and quant.py's references elsewhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_dsv3.fp8 import quant
from megatron_dsv3.fp8.quant import FP8, TILE

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines without Triton: the references are used
    HAVE_TRITON = False

_I32_MAX = 2 ** 31 - 1


if HAVE_TRITON:
    @triton.jit
    def _amax(x, axis: tl.constexpr):
        """max |x| along axis, NaN if any is NaN (as torch.amax)."""
        m = tl.max(tl.abs(x), axis)
        nan = tl.max((x != x).to(tl.int32), axis)
        return tl.where(nan > 0, float("nan"), m)

    @triton.jit
    def _scale(amax, POW2: tl.constexpr):
        """quant._scales, elementwise."""
        s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        if POW2:
            s = tl.where(s < 1.401298464324817e-45, 1.401298464324817e-45, s)      # 2^-149 (NaN stays)
            bits = s.to(tl.int32, bitcast=True)
            e = (bits >> 23) & 0xFF
            mant = bits & 0x7FFFFF
            p_norm = tl.where(mant == 0, bits, (e + 1) << 23)                      # 2^ceil(log2 s), normal s
            mb = mant.to(tl.float32).to(tl.int32, bitcast=True)                    # subnormal: mant's top bit h
            h = ((mb >> 23) & 0xFF) - 127
            p_sub = tl.where((mb & 0x7FFFFF) == 0, bits, tl.full(bits.shape, 1, tl.int32) << (h + 1))
            p = tl.where(e == 0, p_sub, p_norm).to(tl.float32, bitcast=True)
            p = tl.where(amax > 448.0 * p, 2.0 * p, p)                            # fl(s) rounded down onto 2^e
            finite = (s == s) & (s != float("inf"))
            s = tl.where(finite, p, s)
        s = tl.where(s < 1.401298464324817e-45, 1.401298464324817e-45, s)
        s = tl.where(amax == 0.0, 1.0, s)
        return s

    @triton.jit
    def _e4m3(y, HW: tl.constexpr):
        """e4m3(clamp(y, +-448)) as its bits (uint8), rounded to nearest even; c10's float -> e4m3fn rule written
        out off the GPU, since Triton's interpreter mis-rounds its own fp8 cast across a binade (124.3 -> 64)."""
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))          # explicit saturation, NaN kept
        if HW:                                                                    # GPUs: cvt.rn.satfinite, RNE
            return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        u = y.to(tl.int32, bitcast=True)
        sign = (u >> 24) & 0x80
        a = u & 0x7FFFFFFF
        # below 2^-6 (e4m3 subnormals, steps of 2^-9): adding 2^14 rounds to a multiple of 2^-9 (RNE in the add)
        den = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
        # normal: rebias the exponent (127 -> 7), round the mantissa to 3 bits, ties to even
        nrm = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
        r = tl.where(a < (121 << 23), den, nrm)
        r = tl.where(a > 0x7F800000, 0x7F, r)                                     # NaN
        return (r | sign).to(tl.uint8)

    @triton.jit
    def _cast(x, s, HW: tl.constexpr):
        """e4m3 bits of clamp(x / s, +-448), the division rounded to nearest as quant.py's."""
        return _e4m3(tl.math.div_rn(x, s), HW)

    @triton.jit
    def _fma(a, b, c, HW: tl.constexpr):
        """RN(a * b + c), one rounding: the hardware fma on a GPU. The interpreter's tl.fma is a * b + c in float32
        (two roundings: _qdiv's correction then leaves some quotients an ulp off), so here it is written out: the
        float32 product is exact in float64, TwoSum gives the float64 sum and its exact error, rounding the sum to
        odd keeps that error as a sticky bit, and the float64 -> float32 conversion then rounds once, correctly
        (53 >= 24 + 2 bits)."""
        if HW:
            return tl.fma(a, b, c)
        else:
            p = a.to(tl.float64) * b.to(tl.float64)
            c64 = c.to(tl.float64)
            s = p + c64
            bb = s - p
            err = (p - (s - bb)) + (c64 - bb)
            sb = s.to(tl.int64, bitcast=True)
            fix = (err != 0.0) & ((sb & 1) == 0)
            up = (err > 0.0) == (s > 0.0)                                          # |exact| above |s|
            sb = tl.where(fix, tl.where(up, sb + 1, sb - 1), sb)
            return sb.to(tl.float64, bitcast=True).to(tl.float32)

    @triton.jit
    def _recip(s):
        """Per scale (a vector, so the division here is cheap): (a, s a, RN(1 / (s a))) with a = 2^64 for
        s < 2^-60, else 1. Scaling x and s by the same power of 2 is exact and keeps x / s; it puts s a in
        [2^-85, 2^120] (quant's scales are >= 2^-149), where 1 / (s a) is a normal float, exact for a power of 2,
        and _qdiv's residual cannot underflow."""
        a = tl.where(s < 8.673617379884035e-19, 1.8446744073709552e+19, 1.0)          # 2^-60 -> 2^64
        sa = s * a
        return a, sa, tl.math.div_rn(tl.full(sa.shape, 1.0, tl.float32), sa)

    @triton.jit
    def _qdiv(x, a, sa, y, POW2: tl.constexpr, HW: tl.constexpr):
        """RN(x / s) with no division, (a, sa, y) = _recip(s) broadcast against x; s > 0, inf or NaN (quant's
        scales). xa = x a is exact (|x| <= 448 s (1 + 2^-23): no overflow) and xa / sa = x / s.
        POW2: y = 1 / sa exactly, so xa y is the real number x / s and rounds as the division does; s = inf gives
        y = 0 and x * 0 (= x / inf: 0, NaN for x = inf), s = NaN gives NaN.
        Free scales: Markstein's correction. y = RN(1 / sa) makes q0 = RN(xa y) faithful, the fma makes
        r = xa - q0 sa exact, and then RN(q0 + r y) = RN(xa / sa) wherever the quotient is a normal float32 whose
        residual does not underflow: |x / s| >= 2^-12 with sa >= 2^-85. Smaller quotients (e4m3 0 either way) may
        be an ulp off, and q0 + r y rounds to +0 for x = -0 or a tiny negative quotient, so where q1 is 0 the
        faithful q0 (x's sign) is taken. s = inf: y = 0 and r is NaN, so q0 (x * 0 = x / inf) is taken."""
        xa = x * a
        q0 = xa * y
        if POW2:
            return q0
        else:
            r = _fma(q0, -sa, xa, HW)
            q1 = _fma(r, y, q0, HW)
            return tl.where((q1 == 0.0) | (y == 0.0), q0, q1)

    @triton.jit
    def _rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, S_STRIDE_M, S_STRIDE_T,
                     POW2: tl.constexpr, HW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        """The 1x128 tiles of x's [BM, BK] block (pid_m, pid_k): q [M, K], s[m, t] at m S_STRIDE_M + t S_STRIDE_T."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        row0 = pid_m.to(tl.int64) * BM
        nrows = M - pid_m * BM
        r = tl.arange(0, BM)
        c = pid_k * BK + tl.arange(0, BK)
        rmask = r < nrows
        mask = rmask[:, None] & (c < K)[None, :]
        rows = row0 + r                                                              # [BM] int64
        x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale(_amax(x, 1), POW2)                                                # [BM]
        tl.store(q_ptr + rows[:, None] * K + c[None, :], _cast(x, s[:, None], HW), mask=mask)
        tl.store(s_ptr + rows * S_STRIDE_M + pid_k * S_STRIDE_T, s, mask=rmask)

    @triton.jit
    def _cols_kernel(x_ptr, qt_ptr, st_ptr, src_ptr, cnt_ptr, M, K, stride_xm, QT_STRIDE, ST_STRIDE_T,
                     GROUPED: tl.constexpr, POW2: tl.constexpr, HW: tl.constexpr, IDX64: tl.constexpr,
                     BKC: tl.constexpr):
        """The 128x1 tiles of a [128, BKC] strip (row tile pid_m, columns pid_k BKC + [0, BKC)), stored transposed:
        qt[c, 128 pid_m + r] and st[c, pid_m] (st's column stride 1). Plain: rows 128 pid_m + r of x [M, K].
        GROUPED: rows src[pid_m] + r, r < cnt[pid_m], and zeros in qt's padding columns (r >= cnt).
        A column tile needs only its column, so the strip is narrow: few registers, many warps per SM.
        IDX64: int64 addresses, only where an offset can pass 2^31 (int32 address math is cheaper)."""
        BT: tl.constexpr = 128
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = pid_m.to(tl.int64) if IDX64 else pid_m
        r = tl.arange(0, BT)
        col = m * BT + r                                                             # qt's column (token) index
        if GROUPED:
            row0 = tl.load(src_ptr + pid_m).to(m.dtype)
            nrows = tl.load(cnt_ptr + pid_m)
        else:
            row0 = m * BT
            nrows = M - pid_m * BT
        rows = row0 + r
        rmask = r < nrows
        c = pid_k * BKC + tl.arange(0, BKC)
        cmask = c < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)                                        # [128, BKC]
        st = _scale(_amax(x, 0), POW2)                                               # [BKC]
        a, sa, y = _recip(st)
        qc = _e4m3(_qdiv(x, a[None, :], sa[None, :], y[None, :], POW2, HW), HW)
        if GROUPED:
            qc = tl.where(rmask[:, None], qc, 0)                                     # the padding gets zeros
            tmask = cmask[:, None] & (r < BT)[None, :]
        else:
            tmask = cmask[:, None] & rmask[None, :]
        tl.store(qt_ptr + c[:, None].to(m.dtype) * QT_STRIDE + col[None, :], tl.trans(qc), mask=tmask)
        tl.store(st_ptr + c + pid_m * ST_STRIDE_T, st, mask=cmask)


if HAVE_TRITON:
    @triton.jit
    def _block_quant_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, stride_we, stride_wn,
                            NB: tl.constexpr, KB: tl.constexpr, TRANSPOSE: tl.constexpr, STRAIGHT: tl.constexpr,
                            POW2: tl.constexpr, HW_CAST: tl.constexpr, B: tl.constexpr):
        """One 128x128 block (i, j) of expert e: quant.quantize_blocks' scale and bytes (STRAIGHT), and with
        TRANSPOSE the same block transposed into W^T's [K, N] (its scale at [j, i])."""
        i = tl.program_id(0)
        j = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        r = i * B + tl.arange(0, B)
        c = j * B + tl.arange(0, B)
        mask = (r < N)[:, None] & (c < K)[None, :]
        x = tl.load(w_ptr + e * stride_we + r[:, None].to(tl.int64) * stride_wn + c[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        row_amax = _amax(x, 1)                                                      # [B], NaN-propagating
        nan = tl.max((row_amax != row_amax).to(tl.int32), 0)
        blk = tl.where(nan > 0, float("nan"), tl.max(row_amax, 0))
        s = _scale(tl.zeros([B], tl.float32) + blk, POW2)                          # [B], all the block's scale
        NK = N * K
        first = tl.arange(0, B) == 0
        q = _cast(x, s[:, None], HW_CAST)                                          # [B (r), B (c)] bytes
        if STRAIGHT:
            tl.store(q_ptr + e * NK + r[:, None].to(tl.int64) * K + c[None, :], q, mask=mask)
            tl.store(s_ptr + e * NB * KB + i * KB + j + tl.arange(0, B) * 0, s, mask=first)
        if TRANSPOSE:
            # W^T's block: one scale for the whole block, so its bytes are q's transposed (a byte transpose through
            # shared memory, not a float32 one and a second cast), stored with W^T's rows contiguous
            qt = tl.trans(q)                                                          # [B (c), B (r)]
            tmask = (c < K)[:, None] & (r < N)[None, :]
            tl.store(qt_ptr + e * NK + c[:, None].to(tl.int64) * N + r[None, :], qt, mask=tmask)
            tl.store(st_ptr + e * NB * KB + j * NB + i + tl.arange(0, B) * 0, s, mask=first)


if HAVE_TRITON:
    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, y_ptr, M, K, S_STRIDE_M, S_STRIDE_T, BM: tl.constexpr, BK: tl.constexpr):
        """y = e4m3(q) * s per 1x128 tile, float32 products rounded once to y's dtype (quant.dequantize_tiles).
        The e4m3 decode written out in integer ops (exact: sign, 4-bit exponent biased 7, 3-bit mantissa,
        subnormals m * 2^-9, 0x7F / 0xFF NaN), the same on a GPU and under Triton's interpreter."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        r = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        c = pid_k * BK + tl.arange(0, BK)
        rmask = r < M
        mask = rmask[:, None] & (c < K)[None, :]
        b = tl.load(q_ptr + r[:, None] * K + c[None, :], mask=mask, other=0).to(tl.int32)
        e = (b >> 3) & 0xF
        m = b & 0x7
        normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125                                          # m * 2^-9
        # the sign as a bit (Triton negates as 0 - x, which loses -0.0)
        sub = (sub.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
        v = tl.where(e == 0, sub, normal)
        v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
        sc = tl.load(s_ptr + r * S_STRIDE_M + pid_k * S_STRIDE_T, mask=rmask, other=1.0)
        tl.store(y_ptr + r[:, None] * K + c[None, :], (v * sc[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def _warps(x, num_warps):
    return {"num_warps": num_warps} if x.is_cuda else {}


def _launch_cols(x, qt, st, src, cnt, n_row_tiles, pow2, bkc, num_warps):
    """_cols_kernel over x [R, K]'s n_row_tiles row tiles (GROUPED when src/cnt are given) into qt [K, Rp]."""
    R, K = x.shape
    qt_stride = qt.stride(0)
    idx64 = max(R * max(K, x.stride(0)), triton.cdiv(K, bkc) * bkc * qt_stride) > _I32_MAX
    grouped = src is not None
    _cols_kernel[(n_row_tiles, triton.cdiv(K, bkc))](
        x, qt.view(torch.uint8), st, src if grouped else x, cnt if grouped else x, R, K, x.stride(0), qt_stride,
        st.stride(1), GROUPED=grouped, POW2=pow2, HW=x.is_cuda, IDX64=idx64, BKC=bkc, **_warps(x, num_warps))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 and (x.dim() < 2 or x.stride(-2) >= x.shape[-1]) else x.contiguous()


def _scales_for_mm(M: int, T: int, device) -> torch.Tensor:
    # [M, T] with stride (1, M): the layout cuBLAS's 1x128 scaling wants (gemm.py then passes it without a copy)
    return torch.empty(T, M, dtype=torch.float32, device=device).t()


def quantize_tiles_triton(x: torch.Tensor, pow2_scales: bool = False, block_m: int = 32,
                          num_warps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_tiles(x) (1x128 tiles along the last dim, any leading dims). For a 2-D x the scales come as
    an [M, T] view of stride (1, M), the layout the block-scaled GEMM takes; same values as the reference."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = _as_rows(x.reshape(-1, K))
    M, T = x2.shape[0], triton.cdiv(K, TILE)
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s = _scales_for_mm(M, T, x.device) if x.dim() == 2 else torch.empty(M, T, dtype=torch.float32, device=x.device)
    if M and K:
        _rows_kernel[(triton.cdiv(M, block_m), T)](x2, q.view(torch.uint8), s, M, K, x2.stride(0), s.stride(0),
                                                   s.stride(1), POW2=pow2_scales, HW=x.is_cuda, BM=block_m, BK=TILE,
                                                   **_warps(x, num_warps or (8 if block_m >= 128 else 4)))
    return q.view(*lead, K), (s if x.dim() == 2 else s.view(*lead, T))


def quantize_tiles_and_transpose_triton(x: torch.Tensor, pow2_scales: bool = False, num_warps: Optional[int] = None
                                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant.quantize_tiles_and_transpose(x [M, K]) -> (q, s, qt [K, M], st [K, ceil(M/128)]): quantize_tiles_triton
    for q, s and _cols_kernel in [128, 32] strips for qt, st (x read twice: see the module docstring).
    s and st come as views of stride (1, rows), the GEMM's layout (see quantize_tiles_triton). num_warps: the
    column kernel's."""
    if x.dim() != 2:
        raise ValueError(f"quantize_tiles_and_transpose needs a 2-D [M, K] input, got shape {tuple(x.shape)}")
    x = _as_rows(x)
    M, K = x.shape
    q, s = quantize_tiles_triton(x, pow2_scales)
    qt = torch.empty(K, M, dtype=FP8, device=x.device)
    st = _scales_for_mm(K, triton.cdiv(M, TILE), x.device)
    if M and K:
        _launch_cols(x, qt, st, None, None, triton.cdiv(M, TILE), pow2_scales, 32, num_warps or 2)
    return q, s, qt, st


def dequantize_tiles_triton(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                            block_m: int = 32) -> torch.Tensor:
    """quant.dequantize_tiles(q [..., K], scale [..., ceil(K/128)], dtype) in one pass (any scale strides: the
    quantisers' (1, M)-strided [M, T] views are read as they are)."""
    if q.dtype != FP8:
        raise TypeError(f"q must be float8_e4m3fn, got {q.dtype}")
    lead, K = q.shape[:-1], q.shape[-1]
    T = triton.cdiv(K, TILE)
    if tuple(scale.shape) != (*lead, T):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; data of shape {tuple(q.shape)} in 1x{TILE} tiles "
                         f"needs {(*lead, T)}")
    q2 = q.reshape(-1, K).contiguous()
    s2 = scale.reshape(-1, T) if scale.dim() != 2 else scale
    M = q2.shape[0]
    y = torch.empty(M, K, dtype=dtype, device=q.device)
    if M and K:
        kw = {"num_warps": 4} if q.is_cuda else {}
        _dequant_kernel[(triton.cdiv(M, block_m), T)](q2.view(torch.uint8), s2, y, M, K, s2.stride(0), s2.stride(1),
                                                      BM=block_m, BK=TILE, **kw)
    return y.view(*lead, K)


def grouped_row_tiles(offs: torch.Tensor, tile: int = TILE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """offs [E] cumulative ends -> (offs_padded [E] int32, src [J] int32, cnt [J] int32, Rp) for J = Rp / tile
    padded row tiles: tile j reads rows src[j] : src[j] + cnt[j]. One host read (Rp, the padded total)."""
    ends = offs.to(torch.int64)
    starts = torch.nn.functional.pad(ends, (1, 0))[:-1]
    n = ends - starts
    ntiles = torch.div(n + tile - 1, tile, rounding_mode="floor")
    offs_p = (ntiles * tile).cumsum(0)
    J = int(offs_p[-1]) // tile if offs_p.numel() else 0
    e = torch.repeat_interleave(torch.arange(n.numel(), device=offs.device), ntiles, output_size=J)
    j_in_e = torch.arange(J, device=offs.device) - (offs_p - ntiles * tile)[e] // tile
    src = starts[e] + j_in_e * tile
    cnt = torch.clamp(n[e] - j_in_e * tile, max=tile)
    return offs_p.to(torch.int32), src.to(torch.int32), cnt.to(torch.int32), J * tile


if HAVE_TRITON:
    @triton.jit
    def _transpose_kernel(src, dst, stride_se, stride_sr, stride_de, stride_dc, B: tl.constexpr):
        """dst[e, c, r] = src[e, r, c] for one whole [B, B] tile (bytes: e4m3 as uint8, or float32 scales)."""
        r = tl.program_id(0) * B + tl.arange(0, B)
        c = tl.program_id(1) * B + tl.arange(0, B)
        e = tl.program_id(2).to(tl.int64)
        t = tl.load(src + e * stride_se + r.to(tl.int64)[:, None] * stride_sr + c[None, :])
        tl.store(dst + e * stride_de + c.to(tl.int64)[:, None] * stride_dc + r[None, :], tl.trans(t))


TRANSPOSE_TILE = 128         # transpose_last2_triton's tile: 128 x 128 at 8 warps, the fastest measured (H200)


def transpose_last2(x: torch.Tensor) -> torch.Tensor:
    """x [..., R, C] -> x.transpose(-2, -1).contiguous(), the same bits: transpose_last2_triton on CUDA where R and
    C are multiples of its tile (every FP8 weight of DeepSeek-V3 width), torch elsewhere (and for the small block
    scales)."""
    if (HAVE_TRITON and x.is_cuda and x.dim() >= 2 and x.element_size() in (1, 4) and x.numel()
            and x.shape[-2] % TRANSPOSE_TILE == 0 and x.shape[-1] % TRANSPOSE_TILE == 0):
        return transpose_last2_triton(x)
    return x.transpose(-2, -1).contiguous()


def transpose_last2_triton(x: torch.Tensor, block: int = TRANSPOSE_TILE, num_warps: int = 8) -> torch.Tensor:
    """x [..., R, C] (1- or 4-byte elements, R and C multiples of block) -> its last two dims transposed,
    contiguous: one pass, each [block, block] tile through shared memory. H200, e4m3 expert stacks [32, 7168, 4096]
    and [32, 2048, 7168]: 3.9 TB/s (copy 4.2, torch's strided copy 0.33 -- which made the 'fprop' weight cache 27 ms
    a stack step slower: 192.1 vs 164.8 ms)."""
    if x.dim() < 2 or x.element_size() not in (1, 4):
        raise ValueError(f"transpose_last2_triton takes [..., R, C] of 1- or 4-byte elements, got {tuple(x.shape)} "
                         f"{x.dtype}")
    R, C = x.shape[-2:]
    if R % block or C % block:
        raise ValueError(f"transpose_last2_triton: the last two dims {(R, C)} must be multiples of {block}")
    if x.numel() == 0:
        return x.transpose(-2, -1).contiguous()
    x3 = x.reshape(-1, R, C)
    if x3.stride(-1) != 1 or x3.stride(-2) != C:
        x3 = x3.contiguous()
    out = torch.empty(x3.shape[0], C, R, dtype=x.dtype, device=x.device)
    view = (lambda t: t.view(torch.uint8)) if x.element_size() == 1 else (lambda t: t)
    _transpose_kernel[(R // block, C // block, x3.shape[0])](
        view(x3), view(out), x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), B=block,
        num_warps=num_warps)
    return out.view(*x.shape[:-2], C, R)


def bounded_row_tiles(offs: torch.Tensor, rows: int, tile: int = TILE):
    """grouped_row_tiles(offs) without reading the device: J = ceil(rows / tile) + E row tiles, a bound on
    sum_e ceil(n_e / tile) known on the host (a tile past the experts' last one reads no row, cnt 0, and writes zero
    columns), so the FP8 experts' Wgrad operands are quantised with no host sync; offs_padded is exact (on the
    device) and the Wgrad GEMM reads only the tiles below it. Rp = J * tile columns: at most E * tile more than the
    exact layout. offs must end within `rows` (not checked: a check would read it back)."""
    ends = offs.to(torch.int64)
    E = ends.numel()
    starts = torch.nn.functional.pad(ends, (1, 0))[:-1]
    n = torch.clamp(ends - starts, min=0)
    ntiles = torch.div(n + tile - 1, tile, rounding_mode="floor")                         # [E]
    tile_end = ntiles.cumsum(0)                                                           # [E]
    J = -(-rows // tile) + E
    j = torch.arange(J, device=offs.device)
    e = torch.searchsorted(tile_end, j, right=True)                                       # expert of tile j (E: none)
    valid = e < E
    ec = torch.clamp(e, max=max(E - 1, 0))
    j_in_e = j - (tile_end - ntiles)[ec] if E else j
    src = torch.where(valid, starts[ec] + j_in_e * tile, 0) if E else torch.zeros_like(j)
    cnt = torch.where(valid, torch.clamp(n[ec] - j_in_e * tile, max=tile), 0) if E else torch.zeros_like(j)
    return (tile_end * tile).to(torch.int32), src.to(torch.int32), cnt.to(torch.int32), J * tile


def checked_row_tiles(offs: torch.Tensor, rows: int):
    """grouped_row_tiles(offs), after checking that the groups end within a tensor of `rows` rows."""
    if offs.numel() and int(offs[-1]) > rows:
        raise ValueError(f"offs ends at row {int(offs[-1])} but x has {rows} rows")
    return grouped_row_tiles(offs)


def quantize_columns_grouped_triton(x: torch.Tensor, offs: torch.Tensor, pow2_scales: bool = False,
                                    num_warps: Optional[int] = None, row_tiles=None
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant.quantize_columns_grouped(x [R, K], offs) -> (qt [K, Rp], st [K, Rp/128], offs_padded).
    row_tiles: grouped_row_tiles / bounded_row_tiles of the same offs made earlier: the routed experts' four Wgrad
    operands of a layer share one (bounded_row_tiles: made without reading the device at all); None: made here,
    exact, with one host read."""
    if x.dim() != 2:
        raise ValueError(f"quantize_columns_grouped needs a 2-D [R, K] input, got shape {tuple(x.shape)}")
    x = _as_rows(x)
    K = x.shape[1]
    offs_p, src, cnt, Rp = row_tiles if row_tiles is not None else checked_row_tiles(offs, x.shape[0])
    qt = torch.empty(K, Rp, dtype=FP8, device=x.device)
    st = _scales_for_mm(K, Rp // TILE, x.device)
    if Rp and K:
        _launch_cols(x, qt, st, src, cnt, Rp // TILE, pow2_scales, 64, num_warps or 2)
    return qt, st, offs_p


def quantize_blocks_triton(w: torch.Tensor, pow2_scales: bool = False, transpose: bool = False,
                           num_warps: Optional[int] = None, straight: bool = True):
    """quant.quantize_blocks of w [N, K], or of each w[e] of a stack [E, N, K] (any N, K), one read of w ->
    (q [.., N, K], s [.., N/128, K/128]) and with transpose=True also (qt [.., K, N], st [.., K/128, N/128]): the
    blocks of W^T, i.e. W's blocks transposed (the Dgrad copy), from the same read. transpose=True, straight=False:
    (qt, st) alone (the copy a GEMM wants, without writing the other)."""
    if not (straight or transpose):
        raise ValueError("quantize_blocks_triton: straight=False needs transpose=True (else there is nothing to make)")
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_blocks needs a 2-D weight or a 3-D stack of them, got shape {tuple(w.shape)}")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    if w3.stride(2) != 1:
        w3 = w3.contiguous()
    E, N, K = w3.shape
    NB, KB = triton.cdiv(N, TILE), triton.cdiv(K, TILE)
    q = torch.empty(E, N, K, dtype=FP8, device=w.device) if straight else None
    s = torch.empty(E, NB, KB, dtype=torch.float32, device=w.device) if straight else None
    qt = torch.empty(E, K, N, dtype=FP8, device=w.device) if transpose else None
    st = torch.empty(E, KB, NB, dtype=torch.float32, device=w.device) if transpose else None
    if E and N and K:
        # 16 warps: on the H200 (2026-11-30, bf16, bench_fp8 --sections wquant) 12-22% faster than 8 in every mode
        # and shape measured (32 x 7168 x 4096 with the transposed copy: 2.45 vs 3.12 ms; 18432 x 7168: 0.160 vs 0.185)
        kw = {"num_warps": num_warps or 16} if w.is_cuda else {}
        qb, sb = (q, s) if straight else (qt, st)                  # (an unwritten pointer is some real buffer)
        _block_quant_kernel[(NB, KB, E)](w3, qb.view(torch.uint8), sb, qt.view(torch.uint8) if transpose else qb,
                                         st if transpose else sb, N, K, w3.stride(0), w3.stride(1),
                                         NB=NB, KB=KB, TRANSPOSE=transpose, STRAIGHT=straight, POW2=pow2_scales,
                                         HW_CAST=w.is_cuda, B=TILE, **kw)
    out = ((q, s) if straight else ()) + ((qt, st) if transpose else ())
    return out if w.dim() == 3 else tuple(t[0] for t in out)


# ---- dispatchers: Triton on CUDA, the reference elsewhere ------------------------------------------------------------
def use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def quantize_tiles_fast(x: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.dim() >= 1:
        return quantize_tiles_triton(x, pow2_scales)
    return quant.quantize_tiles(x, pow2_scales=pow2_scales)


def dequantize_tiles_fast(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if HAVE_TRITON and q.is_cuda and tile == TILE and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dequantize_tiles_triton(q, scale, dtype)
    return quant.dequantize_tiles(q, scale, tile=tile, dtype=dtype)


def quantize_tiles_and_transpose_fast(x: torch.Tensor, pow2_scales: bool = False
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return quantize_tiles_and_transpose_triton(x, pow2_scales)
    return quant.quantize_tiles_and_transpose(x, pow2_scales=pow2_scales)


def quantize_columns_grouped_fast(x: torch.Tensor, offs: torch.Tensor, pow2_scales: bool = False, row_tiles=None
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """row_tiles: see quantize_columns_grouped_triton (the reference pads on its own and ignores it)."""
    if use_triton(x):
        return quantize_columns_grouped_triton(x, offs, pow2_scales, row_tiles=row_tiles)
    return quant.quantize_columns_grouped(x, offs, pow2_scales=pow2_scales)


def _blocks_on_triton(w: torch.Tensor) -> bool:
    # float32 weights go to the reference: on the H200 (Triton 3.6) this kernel returned wrong bytes (1/8 to 3/8 of
    # them, NaNs among them) for float32 input, while bfloat16 input is bit-exact (tests/fp8/test_kernels.py; the
    # interpreter is exact for both). Weights are quantised once per optimizer step (weight_cache.py), so the
    # reference's few extra passes cost little.
    return use_triton(w) and w.dtype != torch.float32


def quantize_blocks_fast(w: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_blocks of w [N, K], or of each w[e] of a stack [E, N, K]."""
    if _blocks_on_triton(w) and w.dim() in (2, 3):
        return quantize_blocks_triton(w, pow2_scales)
    if w.dim() == 3:
        qs = [quant.quantize_blocks(we, pow2_scales=pow2_scales) for we in w]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    return quant.quantize_blocks(w, pow2_scales=pow2_scales)


def quantize_blocks_transposed_fast(w: torch.Tensor, pow2_scales: bool = False):
    """w [N, K] or a stack [E, N, K] -> (qt, st): the 128x128 blocks of W^T (of each w[e]^T) alone, the bits of
    quantize_blocks_and_transpose_fast's second pair without making its first. One Triton pass on CUDA for 16-bit
    weights; elsewhere the reference and a transpose."""
    if _blocks_on_triton(w) and w.dim() in (2, 3):
        return quantize_blocks_triton(w, pow2_scales, transpose=True, straight=False)
    return quantize_blocks_and_transpose_fast(w, pow2_scales)[2:]


def quantize_blocks_and_transpose_fast(w: torch.Tensor, pow2_scales: bool = False):
    """w [N, K] or a stack [E, N, K] -> (q, s, qt, st): quant.quantize_blocks of each weight and the same blocks
    transposed (W^T's, for Dgrad). One Triton pass on CUDA for 16-bit weights; elsewhere the reference and a
    transpose."""
    if _blocks_on_triton(w) and w.dim() in (2, 3):
        return quantize_blocks_triton(w, pow2_scales, transpose=True)
    ws = w if w.dim() == 3 else w.unsqueeze(0)
    qs = [quant.quantize_blocks(we, pow2_scales=pow2_scales) for we in ws]
    q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
    out = (q, s, q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous())
    return out if w.dim() == 3 else tuple(t[0] for t in out)
