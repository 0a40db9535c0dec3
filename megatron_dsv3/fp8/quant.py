"""The paper's fine-grained FP8 quantisation (DeepSeek-V3, section 3.3.2), in plain torch: the reference.

Three tilings, one rule. Activations are scaled per 1x128 tile along the last (contraction) dim
(`quantize_tiles`), weights per 128x128 block (`quantize_blocks`), and the weight-gradient GEMM, which
contracts over tokens, needs activations and output gradients scaled per 128x1 tile (`quantize_columns`).
Every group gets `scale = amax / 448` computed from the data itself (online, no delayed history), and stores
`q = e4m3(x / scale)`, so `x ~ q * scale`; the element of largest magnitude maps to +-448 exactly.

`scale` is the dequantisation multiplier (DeepSeek's `weight_scale_inv`, `torch._scaled_mm`'s `scale_a`/`scale_b`),
always float32. The arithmetic is float32 whatever the input dtype (bf16 inputs are exact in it), in this order:
amax in float32, `scale = amax / 448` (a correctly rounded division), `x / scale` (a division, not a multiply by
a reciprocal), clamp to [-448, 448], round to nearest even into e4m3. Kernels must follow the same order to be
bit-exact with this file; `quantize_blocks` is bit for bit what checkpoint/fp8.py always wrote.

Edge cases, decided once for every tiling:
- all-zero group: scale 1.0, q all zeros, dequantised exactly 0. 1.0 rather than the smallest normal because it is
  what published checkpoints carry for zero blocks (the converter has always written it), it is a power of two
  (so pow2 mode needs no exception), and any finite scale would do: 0 * scale is 0.
- a nonzero amax so small that amax / 448 underflows float32 (amax < ~6e-43) gets the smallest subnormal scale
  2^-149, never 0, so x / scale stays finite (and <= 448).
- `pow2_scales=True`: scale rounded UP to a power of two, the smallest 2^e with amax <= 448 * 2^e (computed
  exactly, not through log2). Dividing by a power of two is exact, so x only rounds once (in the
  e4m3 cast) and never exceeds 448; the price is up to one binade of range (max |q| in [224, 448]).
- inf / NaN inputs propagate, they do not raise: a group holding a NaN gets a NaN scale and NaN everywhere; a group
  holding +-inf gets an inf scale (its finite values quantise to 0, the infs to NaN) and so dequantises to NaN
  everywhere. Other groups are unaffected. Raising would need a host sync per call inside the training step, and
  kernels cannot raise; a caller that must fail fast checks `torch.isfinite(scale).all()` (the scales are 1/128
  of the data) -- the checkpoint converter does.
- saturation is explicit (the clamp): x / scale can exceed 448 by an ulp when amax / 448 rounds down; it rounds
  to 448, whether or not a backend's e4m3 cast saturates.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

E4M3_MAX = 448.0                 # largest finite float8_e4m3fn
TILE = 128                       # the paper's N_C: 1x128 activation tiles, 128x128 weight blocks
FP8 = torch.float8_e4m3fn
_TINY = 2.0 ** -149              # smallest float32 subnormal


def _scales(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """amax (float32, any shape) -> dequantisation scale, same shape; the edge cases of the module docstring."""
    s = amax / torch.full_like(amax, E4M3_MAX)   # a tensor divisor: CUDA multiplies by 1/448 for a Python scalar
    if pow2:
        s = s.clamp_min(_TINY)                                     # (NaN stays NaN)
        m, _ = torch.frexp(s)                                      # s = m * 2^e, m in [0.5, 1)
        p = torch.where(m == 0.5, s, s / m)                        # s / m = 2^e exactly: the power of 2 >= fl(s)
        p = torch.where(amax > E4M3_MAX * p, 2 * p, p)             # fl(s) rounded down onto a power of 2
        s = torch.where(torch.isfinite(s), p, s)
    s = torch.where(amax == 0, torch.ones_like(s), s.clamp_min(_TINY))
    return s


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[-1] == n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def _check_q(q: torch.Tensor) -> None:
    if q.dtype != FP8:
        raise TypeError(f"expected float8_e4m3fn data, got {q.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # e4m3 (4 significant bits) x float32 (24) is exact in float64: a float64 request gets the exact value,
    # anything else the float32 product (one rounding, as the published dequantisation kernel) cast to dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 1 x tile, along the last dim (activations in Fprop / Dgrad)
# ---------------------------------------------------------------------------------------------------------------
def quantize_tiles(x: torch.Tensor, tile: int = TILE, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., ceil(K/tile)]); x ~ q * scale per 1 x tile.

    The partial last tile is scaled by its own amax (zero padding does not change an amax)."""
    if x.dim() == 0:
        raise ValueError("quantize_tiles needs at least one dim (the one tiled)")
    K = x.shape[-1]
    T = math.ceil(K / tile)
    b = _pad_last(x.float(), T * tile).unflatten(-1, (T, tile))   # [..., T, tile]
    scale = _scales(b.abs().amax(-1), pow2_scales)                 # [..., T]
    q = _cast(b, scale[..., None]).flatten(-2)[..., :K]            # [..., K]
    return q.contiguous(), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., K] e4m3, scale [..., ceil(K/tile)] -> [..., K] in dtype."""
    _check_q(q)
    K = q.shape[-1]
    T = math.ceil(K / tile)
    if tuple(scale.shape) != (*q.shape[:-1], T):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; data of shape {tuple(q.shape)} in 1x{tile} tiles "
                         f"needs {(*q.shape[:-1], T)}")
    ct = _compute_dtype(dtype)
    b = _pad_last(q.to(ct), T * tile).unflatten(-1, (T, tile))    # [..., T, tile]
    return (b * scale.to(ct)[..., None]).flatten(-2)[..., :K].to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# tile x 1, along the second-last dim (activations and output gradients in Wgrad, which contracts over tokens)
# ---------------------------------------------------------------------------------------------------------------
def quantize_columns(x: torch.Tensor, tile: int = TILE, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., M, K] -> (q float8_e4m3fn [..., M, K] in x's layout, scale float32 [..., ceil(M/tile), K]).

    Exactly quantize_tiles(x.mT) transposed back: each column is cut into tiles of `tile` rows."""
    if x.dim() < 2:
        raise ValueError("quantize_columns needs [..., M, K]")
    q, scale = quantize_tiles(x.mT, tile, pow2_scales)             # [..., K, M], [..., K, ceil(M/tile)]
    return q.mT.contiguous(), scale.mT.contiguous()


def dequantize_columns(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., M, K] e4m3, scale [..., ceil(M/tile), K] -> [..., M, K] in dtype."""
    if q.dim() < 2:
        raise ValueError("dequantize_columns needs [..., M, K]")
    return dequantize_tiles(q.mT, scale.mT, tile, dtype).mT.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# block x block of a 2-D weight [N, K] (the published weight_scale_inv)
# ---------------------------------------------------------------------------------------------------------------
def block_scale_shape(shape, block: int = TILE) -> Tuple[int, int]:
    """[N, K] -> [ceil(N/block), ceil(K/block)]."""
    n, k = shape
    return math.ceil(n / block), math.ceil(k / block)


def quantize_blocks(w: torch.Tensor, block: int = TILE, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale float32 [ceil(N/block), ceil(K/block)]); w ~ q * scale per block.

    Edge blocks are partial, scaled by their own amax. With the defaults this is the published format."""
    if w.dim() != 2:
        raise ValueError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    R, C = block_scale_shape((N, K), block)
    b = w.float()
    if (N, K) != (R * block, C * block):
        b = torch.nn.functional.pad(b, (0, C * block - K, 0, R * block - N))
    b = b.view(R, block, C, block)                                 # block (i, j) = b[i, :, j, :]
    scale = _scales(b.abs().amax(dim=(1, 3)), pow2_scales)         # [R, C]
    q = _cast(b, scale[:, None, :, None]).view(R * block, C * block)[:N, :K]
    return q.contiguous(), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = TILE,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [N, K] e4m3, scale [ceil(N/block), ceil(K/block)] -> [N, K] in dtype."""
    _check_q(q)
    if q.dim() != 2:
        raise ValueError(f"FP8 block dequantisation needs a 2-D weight, got shape {tuple(q.shape)}")
    N, K = q.shape
    R, C = block_scale_shape((N, K), block)
    if tuple(scale.shape) != (R, C):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; a weight of shape {(N, K)} with {block}x{block} "
                         f"blocks needs {(R, C)}")
    ct = _compute_dtype(dtype)
    b = q.to(ct)
    if (N, K) != (R * block, C * block):
        b = torch.nn.functional.pad(b, (0, C * block - K, 0, R * block - N))
    b = b.view(R, block, C, block) * scale.to(ct)[:, None, :, None]
    return b.view(R * block, C * block)[:N, :K].to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# the definition the FP8 GEMMs are tested against
# ---------------------------------------------------------------------------------------------------------------
def dequantized_matmul(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                       tile: int = TILE, b_scaling: str = "blocks") -> torch.Tensor:
    """deq(A) @ deq(B)^T in float64, where dequantisation is exact: A [..., K] in 1 x tile tiles (sa [..., K/tile]),
    B [N, K] (the nn.Linear weight layout) in tile x tile blocks (sb [N/tile, K/tile]; b_scaling="blocks", Fprop
    and Dgrad) or in 1 x tile tiles (sb [N, K/tile]; b_scaling="tiles", Wgrad after transposing both column-
    quantised operands so that K is the token dim). -> [..., N] float64.

    An FP8 GEMM with float32 accumulation differs from this only by the float32 rounding of its partial sums."""
    if b_scaling == "blocks":
        b = dequantize_blocks(qb, sb, tile, torch.float64)
    elif b_scaling == "tiles":
        b = dequantize_tiles(qb, sb, tile, torch.float64)
    else:
        raise ValueError(f"b_scaling must be 'blocks' or 'tiles', got {b_scaling!r}")
    if qa.shape[-1] != qb.shape[-1]:
        raise ValueError(f"contraction dims differ: A {tuple(qa.shape)}, B {tuple(qb.shape)}")
    return dequantize_tiles(qa, sa, tile, torch.float64) @ b.T       # [..., K] @ [K, N] -> [..., N]


# ---------------------------------------------------------------------------------------------------------------
# the layouts the FP8 GEMMs (gemm.py) consume: both copies of an activation, and the experts' Wgrad operands
# ---------------------------------------------------------------------------------------------------------------
def quantize_tiles_and_transpose(x: torch.Tensor, tile: int = TILE, pow2_scales: bool = False
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], s [M, ceil(K/tile)], qt [K, M], st [K, ceil(M/tile)]): quantize_tiles(x) for Fprop /
    Dgrad, and quantize_tiles(x.t()) -- the 128x1 column tiles, stored transposed so that the token dim M is the
    contraction dim of the Wgrad GEMM. (qt, st) is quantize_columns(x) with both outputs transposed."""
    if x.dim() != 2:
        raise ValueError(f"quantize_tiles_and_transpose needs a 2-D [M, K] input, got shape {tuple(x.shape)}")
    q, s = quantize_tiles(x, tile, pow2_scales)
    qt, st = quantize_tiles(x.t(), tile, pow2_scales)
    return q, s, qt, st


def padded_group_offsets(offs: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Cumulative group ends offs [E] (int32, torch._grouped_mm's convention) -> the ends when every group is
    padded to a multiple of `tile` rows: group e then starts at a multiple of `tile`, so no tile straddles two."""
    ends = offs.to(torch.int64)
    n = ends - torch.nn.functional.pad(ends, (1, 0))[:-1]                       # rows per group
    return (torch.div(n + tile - 1, tile, rounding_mode="floor") * tile).cumsum(0).to(torch.int32)


def quantize_columns_grouped(x: torch.Tensor, offs: torch.Tensor, tile: int = TILE, pow2_scales: bool = False
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed experts' Wgrad operand. x [R, K] with rows grouped by expert (group e = rows offs[e-1]:offs[e])
    -> (qt [K, Rp] e4m3, st [K, Rp/tile] float32, offs_padded [E] int32).

    Each group's rows are quantised in 128x1 column tiles that restart at the group's first row, stored transposed
    (tokens last) with the group padded by zero columns to a multiple of `tile`: group e occupies
    qt[:, offs_padded[e-1]:offs_padded[e]], a group's partial last tile is scaled by its own amax (the zero padding
    does not change an amax), an empty group occupies nothing. Rp = offs_padded[-1] (read on the host)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_columns_grouped needs a 2-D [R, K] input, got shape {tuple(x.shape)}")
    offs_p = padded_group_offsets(offs, tile)
    ends, ends_p = offs.tolist(), offs_p.tolist()
    if ends and ends[-1] > x.shape[0]:
        raise ValueError(f"offs ends at row {ends[-1]} but x has {x.shape[0]} rows")
    K, Rp = x.shape[1], (ends_p[-1] if ends_p else 0)
    qt = torch.zeros(K, Rp, dtype=FP8, device=x.device)
    st = torch.ones(K, Rp // tile, dtype=torch.float32, device=x.device)
    a = a_p = 0
    for b, b_p in zip(ends, ends_p):
        if b > a:
            q, s = quantize_tiles(x[a:b].t(), tile, pow2_scales)               # [K, n_e], [K, ceil(n_e/tile)]
            qt[:, a_p:a_p + (b - a)] = q
            st[:, a_p // tile:b_p // tile] = s
        a, a_p = b, b_p
    return qt, st, offs_p
