"""FP8 weights as DeepSeek-V3 publishes them: float8_e4m3fn values with one float32 scale per 128x128 block.

A checkpoint stores `W.weight` ([out, in], float8_e4m3fn) and `W.weight_scale_inv`
([ceil(out/128), ceil(in/128)], float32); the real weight is `weight * weight_scale_inv` block by block
(edge blocks are partial). The published scale of a block is `amax(|w|) / 448` (448 = largest e4m3 value),
so the largest element of every block quantises to +-448.

Exactness of FP8 -> float32 -> FP8: a dequantised block `q * s` in float32 does not always give back `s`
as `amax / 448` in float32 (about 10% of random scales are off by one ulp, because `fl(448 s) / 448` is
not `s`). When a block is exactly `e4m3 x scale` for a scale within two ulps of `amax / 448` (it came
from an FP8 checkpoint), `quantize_blockwise` takes that scale, so the bytes and scales round-trip;
otherwise (weights trained in higher precision) it is `amax / 448` as published.

The quantiser is megatron_dsv3/fp8/quant.py's `quantize_blocks` (one quantiser for training and checkpoints);
this file adds what only a checkpoint needs: whole tensors a band of rows at a time (bounded float32 temporaries),
the lossless-round-trip refinement above, and a refusal of non-finite weights.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from megatron_dsv3.fp8.quant import E4M3_MAX, FP8, block_scale_shape, dequantize_blocks, quantize_blocks

BLOCK = 128
__all__ = ["E4M3_MAX", "BLOCK", "scale_shape", "quantize_blockwise", "dequantize_blockwise"]


def scale_shape(shape, block: int = BLOCK) -> Tuple[int, int]:
    """Shape of weight_scale_inv for a 2-D weight of this shape."""
    return block_scale_shape(shape, block)


def _bands(rows: int, block: int, rows_per_step: int):
    # row bands aligned to whole blocks: (r0, r1) of the weight, (b0, b1) of its scale
    step = max(block, rows_per_step // block * block)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, r0 // block, math.ceil(r1 / block)


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32, rows_per_step: int = 8 * BLOCK) -> torch.Tensor:
    """weight [out, in] e4m3 * scale_inv [ceil(out/b), ceil(in/b)] -> [out, in] in `dtype`.

    Computed in float32 (as the published reference kernel), a band of `rows_per_step` rows at a time so
    the float32 temporaries stay a fraction of the tensor."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block dequantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != scale_shape((rows, cols), block):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a weight of shape {(rows, cols)} "
                         f"with {block}x{block} blocks needs {scale_shape((rows, cols), block)}")
    out = torch.empty(rows, cols, dtype=dtype)
    scale_inv = scale_inv.float()
    for r0, r1, b0, b1 in _bands(rows, block, rows_per_step):
        out[r0:r1] = dequantize_blocks(weight[r0:r1], scale_inv[b0:b1], block, dtype)
    return out


def _recover_scales(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    """In place: blocks of w [rows, cols] that are e4m3 x (a scale a few ulps off amax / 448) get that scale
    and its q, so an FP8 checkpoint read to float32 and written again keeps its bytes."""
    rows, cols = w.shape
    R, C = scale.shape
    pad = lambda t: torch.nn.functional.pad(t, (0, C * block - cols, 0, R * block - rows)).view(R, block, C, block)
    b = pad(w.float())                                             # [R, block, C, block]; block (i, j) = b[i, :, j, :]
    qf = pad(q.float())
    s4 = scale[:, None, :, None]
    x = b / s4
    exact = (qf * s4 == b).all(3).all(1)                           # [R, C]
    # blocks that are e4m3 x (a scale a few ulps off): every x within 1e-5 of the e4m3 grid
    near = ~exact & ((qf - x).abs() <= 1e-5 * x.abs()).all(3).all(1)
    if not bool(near.any()):
        return
    idx = near.nonzero(as_tuple=True)
    bs, s = b.permute(0, 2, 1, 3)[idx], scale[idx][:, None, None]  # [n, block, block], [n, 1, 1]
    up = lambda t: torch.nextafter(t, torch.full_like(t, math.inf))
    down = lambda t: torch.nextafter(t, torch.zeros_like(t))
    done = torch.zeros(s.shape, dtype=torch.bool)
    best = s.clone()
    for cand in (down(s), up(s), down(down(s)), up(up(s))):
        hit = ((bs / cand).to(FP8).float() * cand == bs).flatten(1).all(1)[:, None, None] & ~done
        best = torch.where(hit, cand, best)
        done |= hit
    scale[idx] = best[:, 0, 0]
    qp = torch.nn.functional.pad(q.view(torch.uint8), (0, C * block - cols, 0, R * block - rows))
    qp = qp.view(R, block, C, block).permute(0, 2, 1, 3)           # [R, C, block, block] view for indexing
    qp[idx] = (bs / best).to(FP8).view(torch.uint8)
    q.copy_(qp.permute(0, 2, 1, 3).reshape(R * block, C * block)[:rows, :cols].view(FP8))


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK,
                       rows_per_step: int = 8 * BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (weight e4m3 [out, in], weight_scale_inv float32 [ceil(out/b), ceil(in/b)]).

    megatron_dsv3.fp8.quantize_blocks (scale = amax / 448 per block, all-zero block: 1.0) a band of rows at a
    time, plus the lossless refinement of the module docstring. A non-finite weight raises ValueError."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=FP8)
    scale = torch.empty(scale_shape((rows, cols), block), dtype=torch.float32)
    for r0, r1, b0, b1 in _bands(rows, block, rows_per_step):
        qb, sb = quantize_blocks(weight[r0:r1], block)
        if not bool(torch.isfinite(sb).all()):                     # inf/NaN give non-finite scales (quant.py)
            raise ValueError(f"cannot write a weight holding inf or NaN as FP8 (rows {r0}..{r1})")
        _recover_scales(weight[r0:r1], qb, sb, block)
        q[r0:r1], scale[b0:b1] = qb, sb
    return q, scale
