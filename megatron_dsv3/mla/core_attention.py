"""Core attention softmax(q k^T * scale + mask) v through torch's scaled_dot_product_attention.

Same constructor and forward as megatron-core's DotProductAttention / TEDotProductAttention, so the spec
can swap in TE's (or any fused) kernel without touching MLA's math:
    query [sq, b, n, d_qk], key [sk, b, n, d_qk], value [sk, b, n, d_v] -> [sq, b, n * d_v].

MLA's q/k head dim (d_h + d_h^R, 192 in V3) differs from its v head dim (128). SDPA allows that: it
takes query (..., L, E), key (..., S, E), value (..., S, Ev) and returns (..., L, Ev); the softmax scale is
passed explicitly (it is not 1/sqrt(E) under YaRN), and nothing is padded. Which kernel runs is SDPA's
choice per device: on CPU its math/flash-CPU kernels; on CUDA the cuDNN backend has kernels for E != Ev
(measured on the H200: ~475 TFLOP/s forward+backward at 192/128, where the flash backend has no kernel),
so the default `backends` puts cuDNN first (torch.nn.attention.sdpa_kernel with set_priority), falling back
to efficient and math. No torch.cuda call: the device is the query's.

Under torch.use_deterministic_algorithms(True) (the trainer's --deterministic-mode, Megatron-LM's too) or a config
with megatron-core's deterministic_mode, cuDNN is left out: its backward sums dQ over key blocks with atomics,
so two runs of one step can differ in the last bits (on the H200 several trainings at once drifted apart by 0.8%
in 30 steps; one step's gradients twice on an idle GPU: not bit-equal), and PyTorch has no deterministic cuDNN
backward to ask for. FlashAttention-4 takes cuDNN's place there, with its deterministic backward, where it
imports; then flash and efficient attention, which honour the setting (efficient stops splitting the keys in
backward, when the setting is not warn-only); math is deterministic.

FlashAttention-4 (`"fa4"`; the flash-attn-4 package's CuTe DSL kernels, with SM90 forward and backward for
192/128) runs instead of SDPA where it is the first backend in use, it imports, and the call is one it takes
(CUDA, no padding mask, no dropout, square attention); otherwise SDPA's backends follow, in order. On the H200
(2026-11-30; b 1, s 4096, 128 heads, causal, bf16, forward+backward, two alternating timings each): cuDNN 5.25 /
5.68 ms, FA4 5.50 / 5.39 (max difference from cuDNN 0.016 on gradients of absmax ~4-6.6, bf16), FA4 deterministic
6.37 and bit-equal twice, where efficient attention runs ~7x cuDNN at these head dims. So cuDNN stays first by
default (a tie), and deterministic runs use FA4 (1.2x cuDNN instead of 7x). bench/fetch_fa4.sh installs it.

Masks follow megatron-core: `attention_mask` is boolean, True = masked out, broadcastable to [b, 1, sq, sk]
(padding); with a causal mask type the causal triangle is applied on top of it (so a full causal mask
given as attention_mask is also fine). A query row with nothing to attend to returns zeros on CPU
(torch's safe softmax in SDPA's math path).
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH", "fa4": None}
DEFAULT_CUDA_BACKENDS = ("cudnn", "flash", "efficient", "math")


@lru_cache(maxsize=None)
def flash_attn_4():
    """FlashAttention-4's flash_attn_func (the flash-attn-4 package, CuTe DSL kernels), or None where it does not
    import (it is optional: bench/fetch_fa4.sh brings it to a machine without network)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:   # not installed, or its CUDA libraries missing: SDPA's backends only
        return None
    return flash_attn_func


def fa4_attention(fn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool,
                  deterministic: bool) -> torch.Tensor:
    """Causal / full attention through FlashAttention-4's flash_attn_func `fn`, which takes [b, s, n, d] and
    returns (out [b, s, n, d_v], lse): query/key [s, b, n, d_qk], value [s, b, n, d_v] -> [s, b, n * d_v]
    (transposes are views; at b = 1 they are the same memory). deterministic: its backward without dQ atomics."""
    sq, b, n, _ = query.shape
    out, _ = fn(*(t.transpose(0, 1) for t in (query, key, value)), softmax_scale=scale, causal=causal,
                deterministic=deterministic)
    return out.transpose(0, 1).reshape(sq, b, n * out.shape[-1])


def _is_causal(mask_type) -> bool:
    return mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPAttention(torch.nn.Module):
    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None, cp_comm_type=None,
                 pg_collection=None, backends: Optional[Sequence[str]] = DEFAULT_CUDA_BACKENDS, **_):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else self.k_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        unknown = [b for b in (backends or ()) if b not in _BACKEND_NAMES]
        if unknown:
            raise ValueError(f"SDPAttention backends must be among {sorted(_BACKEND_NAMES)}, got {unknown}")
        self.backends = tuple(backends or ())

    def backends_in_use(self, deterministic: bool) -> tuple:
        """The CUDA backends tried, in order: self.backends; when deterministic, cuDNN's place taken by "fa4" (its
        backward then asked to be deterministic; skipped where it does not import) unless listed already (module
        docstring); if that leaves none, math."""
        if not deterministic:
            return self.backends
        out = []
        for b in self.backends:
            b = "fa4" if b == "cudnn" else b
            if b not in out:
                out.append(b)
        return tuple(out) or ("math",)

    def _deterministic(self) -> bool:
        return torch.are_deterministic_algorithms_enabled() or bool(getattr(self.config, "deterministic_mode", False))

    def _kernel_choice(self, device: torch.device):
        # backend choice matters (and exists) only on CUDA; CPU keeps SDPA's own dispatch
        if device.type != "cuda" or not self.backends:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        names = [b for b in self.backends_in_use(self._deterministic()) if b != "fa4"] or ["math"]
        return sdpa_kernel([getattr(SDPBackend, _BACKEND_NAMES[b]) for b in names], set_priority=True)

    def _fa4(self, device: torch.device, masked: bool, dropout_p: float, sq: int, sk: int):
        """flash_attn_func when "fa4" is the first backend in use, on CUDA, and the call is one it takes (no padding
        mask, no dropout, square causal or full attention); else None (SDPA)."""
        if (device.type != "cuda" or masked or dropout_p or sq != sk
                or next(iter(self.backends_in_use(self._deterministic())), None) != "fa4"):
            return None
        return flash_attn_4()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention: packed (thd) sequences are not supported; use the 'te' backend")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = _is_causal(mask_type)
        sq, b, n, _ = query.shape
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))

        allowed = None  # SDPA's boolean mask: True = may attend
        if attention_mask is not None:
            allowed = ~attention_mask.to(torch.bool)  # [b or 1, 1, sq, sk]
            if causal:
                # the query at i (of the last sq positions) sees keys j <= i + (sk - sq)
                tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
                allowed = allowed & tri
        elif causal and sq != sk:
            allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)

        dropout_p = self.dropout_p if self.training else 0.0
        fn = self._fa4(q.device, attention_mask is not None, dropout_p, sq, sk)
        if fn is not None:
            return fa4_attention(fn, query, key, value, self.softmax_scale, causal, self._deterministic())
        with self._kernel_choice(q.device):
            # [b, n, sq, d_qk] x [b, n, sk, d_qk] x [b, n, sk, d_v] -> [b, n, sq, d_v]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                 is_causal=causal and allowed is None, scale=self.softmax_scale)
        # [b, n, sq, d_v] -> [sq, b, n * d_v]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n * out.shape[-1])
