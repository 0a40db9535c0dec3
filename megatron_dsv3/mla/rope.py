"""Decoupled RoPE for MLA, with YaRN context extension (DeepSeek-V2 section 2.1.3, V3 section 4.3).

Only the decoupled parts q^R (per head) and k^R (one head shared by all heads) are rotated (V3 eq. 3, 7).
With YaRN (Peng et al. 2023) the inverse frequencies are blended between interpolated (theta_i / s) and
extrapolated (theta_i) by a linear ramp over the dimensions whose number of rotations within the original
context lies between beta_slow and beta_fast, exactly as DeepSeek's reference (`precompute_freqs_cis`) and
Hugging Face's `_compute_yarn_parameters` (truncated correction range).

Two attention-temperature corrections, as the published checkpoints expect (and as HF computes them):
  * the softmax scale gets mscale(s, mscale_all_dim)^2 (`MLAConfig.softmax_scale()`);
  * cos and sin are multiplied by `attention_factor` = mscale(s, mscale) / mscale(s, mscale_all_dim)
    (1.0 for DeepSeek-V2/V3, whose mscale == mscale_all_dim; HF falls back to mscale(s) when either is 0).

Layouts (`MLAConfig.rope_interleave`):
  * interleaved (DeepSeek's checkpoints): frequency i rotates the pair (x[2i], x[2i+1]);
  * half-split (GPT-NeoX / Llama style): frequency i rotates (x[i], x[i + d/2]).
The interleaved rotation returns its result de-interleaved, [rotated evens | rotated odds], as HF does:
q^R and k^R always go through the same permutation, so q^R . k^R is unchanged and no copy back is needed.

Angles are computed in float32 (positions x inverse frequencies), as both references do, then cos/sin are
cast to the activation dtype. Tables for positions 0..s-1 are cached per (seq_len, device, dtype); the device
comes from the input. Other positions (packed documents, --reset-position-ids) come as `angles(position_ids)`,
computed once per model forward (model.py) and passed to every layer.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megatron_dsv3.config import MLAConfig, YaRNConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1.0 when s <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(yarn: Optional[YaRNConfig]) -> float:
    """The factor HF multiplies cos and sin by (its `attention_scaling`)."""
    if yarn is None:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return float(yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim))
    return yarn_get_mscale(yarn.factor)


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # the dimension index 2i at which the wavelength 2*pi/theta_i fits num_rotations times into max_pos
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inverse_frequencies(dim: int, base: float, yarn: Optional[YaRNConfig] = None) -> torch.Tensor:
    """theta_i = base^(-2i/dim), i < dim/2 (float32, CPU), YaRN-blended when `yarn` is given."""
    # [dim/2]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if yarn is None:
        return 1.0 / pos_freqs
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (yarn.factor * pos_freqs)
    low = math.floor(_correction_dim(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings))
    high = math.ceil(_correction_dim(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # ramp: 0 below `low` (fast-rotating dims keep theta_i), 1 above `high` (slow dims get theta_i / s)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding:
    """cos/sin tables of the decoupled rope dims for an MLAConfig (no parameters, no buffers)."""

    def __init__(self, mla: MLAConfig):
        self.dim = mla.qk_rope_head_dim
        self.interleaved = mla.rope_interleave
        self.inv_freq = inverse_frequencies(self.dim, mla.rope_theta, mla.yarn)  # [d/2] float32, CPU
        self.attention_factor = rope_attention_factor(mla.yarn)
        self._cache = {}

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        # positions [...] -> angles [..., d/2], float32 as the references
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return self.cos_sin_from_angles(angles, dtype)

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [b, s] -> angles [s, b, 1, d/2] (float32: positions x theta_i). What DSV3Model computes
        once per forward and hands every MLA layer as megatron-core's `rotary_pos_emb`."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")
        pos = position_ids.transpose(0, 1).to(torch.float32)                       # [s, b]
        return (pos[..., None] * self.inv_freq.to(position_ids.device))[:, :, None, :]

    def cos_sin_from_angles(self, angles: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """angles [..., d/2] float32 -> cos, sin [..., d/2] in `dtype`, with YaRN's attention factor."""
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype,
                position_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [s, 1, 1, d/2] (positions 0..s-1) or [s, b, 1, d/2] (position_ids [b, s]),
        broadcastable against [s, b, heads, d/2]."""
        if position_ids is not None:
            return self.cos_sin_from_angles(self.angles(position_ids.to(device)), dtype)  # [s, b, 1, d/2]
        key = (seq_len, torch.device(device), dtype)
        if key not in self._cache:
            if len(self._cache) >= 8:
                self._cache.clear()
            cos, sin = self._tables(torch.arange(seq_len, device=device), dtype)  # [s, d/2]
            self._cache[key] = (cos[:, None, None, :], sin[:, None, None, :])
        return self._cache[key]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin, self.interleaved)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., d] by angles with cos, sin [..., d/2] (broadcast): V3 eq. 3 and 7, RoPE(W x)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]   # pairs (x[2i], x[2i+1])
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]  # pairs (x[i], x[i + d/2])
    # (x1 + i x2) * (cos + i sin); interleaved output is [rotated evens | rotated odds] (see module note)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
