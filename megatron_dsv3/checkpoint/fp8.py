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

These are the checkpoint-format helpers (whole tensors, plain torch, float32 arithmetic); the training-time
FP8 kernels live in megatron_dsv3/fp8/.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

E4M3_MAX = 448.0
BLOCK = 128


def scale_shape(shape, block: int = BLOCK) -> Tuple[int, int]:
    """Shape of weight_scale_inv for a 2-D weight of this shape."""
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def _expand(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    # [R, C] per-block scales -> [rows, cols] per-element (edge blocks cut)
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


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
    step = max(block, rows_per_step // block * block)
    scale_inv = scale_inv.float()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = _expand(scale_inv[r0 // block: math.ceil(r1 / block)], r1 - r0, cols, block)
        out[r0:r1] = (weight[r0:r1].float() * s).to(dtype)
    return out


def _quantize_band(w: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    R, C = scale_shape((rows, cols), block)
    w = w.float()
    if (rows, cols) != (R * block, C * block):                       # zero-pad the edge blocks (amax unchanged)
        w = torch.nn.functional.pad(w, (0, C * block - cols, 0, R * block - rows))
    b = w.view(R, block, C, block)                                 # block (i, j) = b[i, :, j, :]
    amax = b.abs().amax(dim=(1, 3), keepdim=True)                  # [R, 1, C, 1]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # published: amax / 448
    x = b / scale
    q = x.to(torch.float8_e4m3fn)                                  # |x| <= 448: no saturation
    qf = q.float()
    exact = (qf * scale == b).all(3).all(1)                        # [R, C]
    # blocks that are e4m3 x (a scale a few ulps off): every x within 1e-5 of the e4m3 grid
    near = ~exact & ((qf - x).abs() <= 1e-5 * x.abs()).all(3).all(1)
    scale = scale.view(R, C)
    if bool(near.any()):
        q = q.permute(0, 2, 1, 3)                                  # [R, C, block, block] view for indexing
        idx = near.nonzero(as_tuple=True)
        bs, s = b.permute(0, 2, 1, 3)[idx], scale[idx][:, None, None]   # [n, block, block], [n, 1, 1]
        up = lambda t: torch.nextafter(t, torch.full_like(t, math.inf))
        down = lambda t: torch.nextafter(t, torch.zeros_like(t))
        done = torch.zeros(s.shape, dtype=torch.bool)
        best = s.clone()
        for cand in (down(s), up(s), down(down(s)), up(up(s))):
            hit = ((bs / cand).to(torch.float8_e4m3fn).float() * cand == bs).flatten(1).all(1)[:, None, None] & ~done
            best = torch.where(hit, cand, best)
            done |= hit
        scale[idx] = best[:, 0, 0]
        q[idx] = (bs / best).to(torch.float8_e4m3fn)
        q = q.permute(0, 2, 1, 3)
    q = q.reshape(R * block, C * block)[:rows, :cols]
    return q.contiguous(), scale


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK,
                       rows_per_step: int = 8 * BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (weight e4m3 [out, in], weight_scale_inv float32 [ceil(out/b), ceil(in/b)]).

    scale = amax / 448 per block (all-zero block: 1.0), weight = (w / scale) cast to e4m3;
    see the module docstring for the lossless refinement. Processed a band of rows at a time."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    step = max(block, rows_per_step // block * block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(scale_shape((rows, cols), block), dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        q[r0:r1], scale[r0 // block: math.ceil(r1 / block)] = _quantize_band(weight[r0:r1], block)
    return q, scale
