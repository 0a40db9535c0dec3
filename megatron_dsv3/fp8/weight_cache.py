"""FP8 copies of the weights, made once per optimizer step and shared by every micro-batch (as Transformer Engine
caches its FP8 weights across micro-batches).

Without the cache each FP8 GEMM quantises its weight again: every micro-batch's forward (the 128x128 blocks) and
backward (the same blocks, transposed for Dgrad) -- two quantiser passes over every FP8 weight per micro-batch, for a
result that only changes when the optimizer steps. With it, the first use after a step quantises and keeps the copy,
and the rest of the step's micro-batches (and their backwards) take it as it is.

    cached(param, kind, make) -> make(param), computed once per (kind, state of param)

The copy is stored on the parameter (`param._dsv3_fp8_cache[kind]`) with the key it was made under, and is used only
while the key still matches:
- `param._version` and `param.data_ptr()`: any in-place update through autograd's version counter (torch's optimizers,
  `param.copy_` under no_grad, a checkpoint's load_state_dict) or a new storage makes it stale;
- megatron's optimizers write the weights behind the version counter (`.data.copy_` of the FP32 masters, the
  distributed optimizer's all-gather into the parameter buffer), so the trainer also drops every copy after each
  optimizer step: `drop_caches(model_chunks)`, called from training/hooks.py's after_optimizer_step (the one
  after-the-step routine, for our trainer and the Megatron-LM entry alike). Dropping (rather than re-quantising at
  once) frees the copies during the optimizer step; the next forward makes them again.
Any other code writing weights behind autograd (`.data` assignments) must call drop_caches too.

Memory: per FP8 weight, both copies (Fprop's blocks and Dgrad's transposed blocks), 2 bytes per parameter plus one
float32 scale per 128x128 block of each; kept from the first use to the end of the step. FP8Config.weight_cache
(default True) switches it; configure(model, fp8_config) applies it to a built model (model.py's build_model), and
training/memory.py counts it. "fprop" keeps Fprop's copy only (1 byte per parameter) and makes Dgrad's in each
backward by transposing its bytes and scales (transposed_blocks): a 128x128 block's amax is its transpose's, so
these are the bits quantising W^T gives, for a read and a write of 1 byte per parameter instead of a quantiser's
pass over the 2-byte weight. False: every GEMM quantises its weight as before (bit-identical results: the
quantisers are deterministic, tests/fp8/test_weight_cache.py).
"""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import torch

__all__ = ["cached", "drop_caches", "configure", "cache_mode", "transposed_blocks", "ATTR", "ENABLE_ATTR", "FPROP"]

ATTR = "_dsv3_fp8_cache"              # on a parameter: {kind: (key, value)}
ENABLE_ATTR = "fp8_weight_cache"      # on an FP8 module: whether its weights' copies are cached (default True)


FPROP = "fprop"                       # FP8Config.weight_cache: keep Fprop's copy only


def cache_mode(value):
    """FP8Config.weight_cache's value as the FP8 Functions take it: True (both copies), FPROP or False."""
    return FPROP if value == FPROP else bool(value)


def transposed_blocks(q: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 128x128 blocks of W^T from W's (q [..., N, K], s [..., N/128, K/128]): both transposed, contiguous."""
    from megatron_dsv3.fp8.kernels import transpose_last2
    return transpose_last2(q), transpose_last2(s)


def _key(p: torch.Tensor) -> Tuple:
    return (p._version, p.data_ptr(), tuple(p.shape), p.dtype, p.device)


def cached(param: torch.Tensor, kind: str, make: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]],
           enabled: bool = True):
    """make(param) (a tuple of tensors computed from param's values, under no_grad), from the cache when param has
    not changed since it was made under this `kind`. enabled=False computes it and keeps nothing."""
    if not enabled:
        with torch.no_grad():
            return make(param)
    store = getattr(param, ATTR, None)
    if store is None:
        store = {}
        setattr(param, ATTR, store)
    key = _key(param)
    hit = store.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = make(param)
    store[kind] = (key, value)
    return value


def _modules(model_chunks) -> Iterable[torch.nn.Module]:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for c in chunks:
        yield from c.modules()


def drop_caches(model_chunks) -> int:
    """Forget every cached FP8 weight copy of the chunks' parameters (after an optimizer step). -> copies dropped."""
    n = 0
    for m in _modules(model_chunks):
        for p in m.parameters(recurse=False):
            store = getattr(p, ATTR, None)
            if store:
                n += len(store)
                store.clear()
    return n


def configure(model_chunks, fp8_config) -> None:
    """Applies FP8Config to the chunks' FP8 modules: weight_cache on those with the ENABLE_ATTR switch, grouped_gemm
    on the FP8 experts (their `fp8_grouped_gemm`: gemm.fp8_grouped_gemm's backend)."""
    on = cache_mode(getattr(fp8_config, "weight_cache", True))
    grouped = getattr(fp8_config, "grouped_gemm", "triton")
    for m in _modules(model_chunks):
        if hasattr(m, ENABLE_ATTR):
            setattr(m, ENABLE_ATTR, on)
        if hasattr(m, "fp8_grouped_gemm"):
            m.fp8_grouped_gemm = grouped
    drop_caches(model_chunks)              # copies made under another mode (or kept with the cache now off)
