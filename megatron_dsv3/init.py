"""The paper's initialisation (DeepSeek-V3 section 4.2), as one pass over a built model chunk.

    every weight ~ N(0, init_method_std)   (0.006 for V3; also the output projections linear_proj, dense and
                                            shared linear_fc2, experts' weight2, unless DSV3Config.scaled_output_init:
                                            then megatron-core's std / sqrt(2 * num_layers))
    RMSNorm gains = 1, biases = 0, the router's expert bias b = 0

Design note. build_model allocates every tensor on the chunk's device without megatron-core's random init
(perform_initialization=False), then calls `init_weights` once. It replaces megatron's per-layer init, which
draws each rank's shard from a per-rank generator (so the model depended on the TP/PP/EP layout) and, with
use_cpu_initialization, built every full weight in float32 on the host.

Layout-free: a tensor's values depend only on (seed, its global name, element index), never on TP/PP/EP/VPP
rank. The chunk's own `sharded_state_dict()` (megatron-core's checkpoint description, the one the distributed
checkpoints are written from) says where each local tensor sits in its global tensor: key = global name (global
layer index), global_shape, global_offset; megatron's GLU [gate; up] layout comes through its ShardedTensorFactory.
The global tensor is drawn in chunks of whole rows along its dim 0, chunk c from a generator seeded with
hash(seed, key, c); the chunk boundaries depend only on the global shape (rows per chunk = 2^24 elements / row
size, so a routed expert's [h, 2f] is one chunk at full size: one expert in memory at a time), and each rank
draws only the chunks that overlap its slice, on its own device, in float32, then copies its slice (cast to
params_dtype: float32 and bf16 models agree up to the cast). The vocabulary's padding rows (embedding and
output head: rows >= vocab_size, whose count depends on the TP size) are zero, so rows that exist are the same
whatever the padding.

The values depend on the device type (CPU and CUDA generators differ): a CPU-built model equals every other
CPU-built one, a CUDA-built one every other CUDA-built one.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional

import torch

__all__ = ["init_weights", "CHUNK_NUMEL"]

CHUNK_NUMEL = 1 << 24   # elements per draw (64 MiB in float32): bounds the transient memory of the pass

# megatron-core's output_layer_init_method targets (the ones scaled_output_init scales)
OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight",
                      "mlp.shared_experts.linear_fc2.weight", "mlp.experts.weight2")
ONES = ("norm.weight", "layer_norm_weight")                       # RMSNorm gains (TE's fused norm: layer_norm_weight)
ZEROS = ("router.expert_bias", ".bias", "layer_norm_bias")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")   # [padded V, h]


def _rule(key: str, config):
    """-> (value, None) for a constant, (None, std) for N(0, std). Raises for a tensor it does not know."""
    if key.endswith(ONES):
        return 1.0, None
    if key.endswith(ZEROS):
        return 0.0, None
    if key.endswith(OUTPUT_PROJECTIONS):
        scale = math.sqrt(2 * config.num_layers) if config.scaled_output_init else 1.0
        return None, config.init_method_std / scale
    if key.endswith((".weight", "experts.weight1")):
        return None, config.init_method_std
    raise ValueError(f"init_weights: no initialisation rule for {key!r} (megatron_dsv3/init.py: add one)")


def _chunk_seed(seed: int, key: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _fill_normal(sh, std: float, seed: int, rows: int) -> None:
    """sh.data <- its slice of the global N(0, std) tensor sh.key of sh.global_shape; global rows >= `rows` zero."""
    G, off, p = tuple(sh.global_shape), tuple(sh.global_offset), sh.prepend_axis_num
    view = sh.data
    for _ in range(p):                                   # the global tensor's prepended axes: size 1 locally
        view = view.unsqueeze(0)
    V = tuple(view.shape)
    row_numel = math.prod(G[1:])
    R = max(1, CHUNK_NUMEL // max(1, row_numel))         # rows per chunk: a function of the global shape only
    a, b = off[0], off[0] + V[0]                         # this rank's rows along the global dim 0
    rest = tuple(slice(o, o + v) for o, v in zip(off[1:], V[1:]))
    if b > rows:                                         # padding rows (vocab): zero
        view[max(a, rows) - a:] = 0
    end = min(b, rows)
    for c in range(a // R, (end - 1) // R + 1 if end > a else 0):   # the chunks that overlap rows [a, end)
        lo, hi = c * R, min((c + 1) * R, rows)
        g = torch.Generator(device=view.device).manual_seed(_chunk_seed(seed, sh.key, c))
        block = torch.empty((hi - lo,) + G[1:], dtype=torch.float32, device=view.device).normal_(0.0, std, generator=g)
        r0, r1 = max(a, lo), min(b, hi)
        view[r0 - a:r1 - a].copy_(block[(slice(r0 - lo, r1 - lo),) + rest])


def _sharded_tensors(model, metadata):
    """The chunk's ShardedTensors, factories (megatron's GLU [gate; up] split) built into their parts."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    def expand(v):
        if isinstance(v, ShardedTensor):
            yield v
        elif isinstance(v, ShardedTensorFactory):
            built = v.build()
            for part in (nested_values(built) if isinstance(built, (dict, list)) else [built]):
                yield from expand(part)
        elif not isinstance(v, ShardedObject):   # TE's _extra_state (FP8 metadata, not a tensor): nothing to draw
            raise TypeError(f"init_weights: unexpected {type(v).__name__} in the sharded state dict")

    for v in nested_values(model.sharded_state_dict(metadata=metadata)):
        yield from expand(v)


def _persistent_tensors(model) -> Dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


@torch.no_grad()
def init_weights(model, config, seed: int, metadata: Optional[dict] = None) -> None:
    """Initialise every parameter and persistent buffer of `model` (a DSV3Model chunk, or any module of ours with
    a sharded_state_dict) as in the module docstring. config: the DSV3Config. metadata: sharded_state_dict's
    (the data-parallel group, when megatron-core's parallel_state does not have it). Raises if a parameter or
    persistent buffer is not reached (nothing is left uninitialised)."""
    tensors = _persistent_tensors(model)
    owners = {}   # storage -> the parameter or buffer whose views the sharded state dict holds
    for name, t in tensors.items():
        owners.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    written = {name: 0 for name in tensors}
    for sh in _sharded_tensors(model, metadata):
        if sh.flattened_range is not None:
            raise ValueError(f"init_weights: {sh.key} is a flattened (optimizer) shard")
        names = owners.get(sh.data.untyped_storage().data_ptr())
        if not names:
            raise ValueError(f"init_weights: {sh.key} is not a view of a parameter or persistent buffer")
        value, std = _rule(sh.key, config)
        if value is not None:
            sh.data.fill_(value)
        else:
            rows = sh.global_shape[0]
            if sh.key.endswith(VOCAB_ROWS) and sh.prepend_axis_num == 0:
                rows = min(rows, config.vocab_size)
            _fill_normal(sh, std, seed, rows)
        written[names[0]] += sh.data.numel()
    missed = sorted(n for n, count in written.items() if count != tensors[n].numel())
    if missed:
        raise ValueError(f"init_weights: not initialised (or written twice) by the sharded state dict: {missed}")
