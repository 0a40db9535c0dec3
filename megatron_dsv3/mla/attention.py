"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1, eqs. 1-11).

    c^KV = W^DKV h                       (eq. 1)  linear_kv_down_proj -> [kv_lora | rope], kv_layernorm on c^KV
    [k^C_1..k^C_n ; v^C_1..v^C_n] = W^UK c^KV, W^UV c^KV   (eqs. 2, 5)  linear_kv_up_proj
    k^R = RoPE(W^KR h)                   (eq. 3)  the rope slice of linear_kv_down_proj, one head for all heads
    k_i = [k^C_i ; k^R]                  (eq. 4)
    c^Q = W^DQ h                         (eq. 6)  linear_q_down_proj, q_layernorm
    [q^C_i] = W^UQ c^Q, [q^R_i] = RoPE(W^QR c^Q)   (eqs. 7, 8)  linear_q_up_proj (or linear_q_proj on h, V2-Lite)
    q_i = [q^C_i ; q^R_i]                (eq. 9)
    o_i = softmax(q_i k_j^T * scale) v^C_j  (eq. 10)  core_attention; scale = 1/sqrt(d_h + d_h^R) * YaRN mscale^2
    u = W^O [o_1..o_n]                   (eq. 11) linear_proj

Tensor parallelism is over heads: the down-projections and latent norms are duplicated on every TP rank,
the up-projections are column-parallel (head-major rows, as HF's `.view(heads, dim)`), the output projection
is row-parallel. Under sequence parallelism the input is the rank's sequence shard: the down-projections and
norms run on the shard, the column-parallel up-projections all-gather their input along the sequence, k^R is
gathered explicitly, and the row-parallel output reduce-scatters back to the shard. Without sequence
parallelism k^R passes through copy_to_tensor_model_parallel_region: it feeds only this rank's heads, so its
gradient (and through it the input's and W^KR's) must be summed over TP, as the up-projections do for the
latents. (Reading megatron-core 0.16.1's MLA, its duplicated-down-projection path without sequence parallel
has no such reduction; not run here, since that path needs TE.)

Measured and removed (H200, 2026-11-30): both down-projections in one GEMM each way (7168 -> 2112, weights kept
apart) ran MLA alone in 12.84 vs 12.86 ms, no gain for the extra autograd function.

Recompute (V3 section 3.2.2, MLAConfig.recompute_up_proj): the latent norms, up-projections and the q/k/v
assembly run under a non-reentrant activation checkpoint, and the attention core's saved q, k, v are replaced by a
recipe (RecomputedQKV) that makes them again from the latents in backward: only the latents (and k^R) are kept,
H (2 (d_h + d_h^R) + d_v) elements a token fewer (131,072 bytes at V3 width). Backward runs the up-projections
twice (once for the core's q, k, v, once inside the checkpoint for their gradients).

Layout: activations [s, b, h]; per-head tensors [s, b, n, d]. Rope and YaRN come from MLAConfig (rope.py).
Positions: 0..s-1, or the rope angles [s, b, 1, d_h^R/2] that DSV3Model computes once per forward from
position_ids and passes as megatron-core's `rotary_pos_emb` (the one rope argument its TransformerBlock forwards
on every path, full-layer recompute included; rotary_pos_cos/sin are dropped there in 0.16-0.19). The angles
cover the full sequence: rope is applied after the up-projections (and k^R's gather under sequence parallel).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                     gather_from_sequence_parallel_region)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3.compat import get_process_group_collection
from megatron_dsv3.config import MLAConfig
from megatron_dsv3.mla.kernels import assemble_qkv
from megatron_dsv3.mla.rope import RotaryEmbedding

# DeepSeek's reference and HF build the latent RMSNorms with their default eps, whatever rms_norm_eps says
LATENT_NORM_EPS = 1e-6


class RecomputedQKV:
    """Keeps q, k, v out of what the attention core saves for backward (DeepSeek-V3 section 3.2.2: the MLA
    up-projections are recomputed, so only the latents stay): a saved-tensors hook stores, for any saved tensor
    living in q's, k's or v's storage (the tensors themselves or the core's views of them), which one it was and
    its geometry; the first unpack in backward runs make(*inputs) again without a graph (the same calls on the same
    inputs: the same bits) and every saved view is rebuilt from it. Anything else the core saves stays as it is."""

    def __init__(self, make, inputs, outputs):
        self.make, self.inputs = make, inputs
        self.index = {t.untyped_storage().data_ptr(): i for i, t in enumerate(outputs)}
        self.again = None

    def pack(self, t: torch.Tensor):
        i = self.index.get(t.untyped_storage().data_ptr())
        if i is None:
            return t
        return (self, i, t.size(), t.stride(), t.storage_offset(), t.dtype)

    @staticmethod
    def unpack(obj):
        if not isinstance(obj, tuple):
            return obj
        self, i, size, stride, offset, dtype = obj
        if self.again is None:
            with torch.no_grad():
                self.again = self.make(*self.inputs)
        base = self.again[i]
        if base.dtype != dtype:
            raise RuntimeError("MLA up-projection recompute: a recomputed tensor changed dtype")
        return base.as_strided(size, stride, offset)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass
class MLASubmodules:
    linear_q_down_proj: Union[ModuleSpec, type, None] = None  # W^DQ   h -> q_lora            (duplicated)
    q_layernorm: Union[ModuleSpec, type, None] = None         # RMSNorm on c^Q
    linear_q_up_proj: Union[ModuleSpec, type, None] = None    # W^UQ;W^QR  q_lora -> n*(d_h+d_h^R)  (column)
    linear_q_proj: Union[ModuleSpec, type, None] = None       # q_lora_rank None: h -> n*(d_h+d_h^R)  (column)
    linear_kv_down_proj: Union[ModuleSpec, type, None] = None  # W^DKV;W^KR  h -> kv_lora + d_h^R   (duplicated)
    kv_layernorm: Union[ModuleSpec, type, None] = None        # RMSNorm on c^KV
    linear_kv_up_proj: Union[ModuleSpec, type, None] = None   # W^UK;W^UV  kv_lora -> n*(d_h+d_v)  (column)
    core_attention: Union[ModuleSpec, type, None] = None      # softmax(q k^T * scale) v
    linear_proj: Union[ModuleSpec, type, None] = None         # W^O  n*d_v -> h  (row)


class MLASelfAttention(MegatronModule):
    def __init__(self, config, submodules: MLASubmodules, layer_number: int, mla: MLAConfig,
                 attn_mask_type=AttnMaskType.causal, pg_collection=None, cp_comm_type=None, **kwargs):
        super().__init__(config=config)
        self.mla = mla
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        pg = get_process_group_collection(pg_collection)
        self.tp_group = pg.tp
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        cp = getattr(pg, "cp", None)
        if cp is not None and cp.size() > 1:
            raise NotImplementedError("MLASelfAttention does not support context parallelism yet")
        if config.num_attention_heads % self.tp_size:
            raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be divisible by the "
                             f"tensor-parallel size ({self.tp_size})")
        self.num_heads = config.num_attention_heads // self.tp_size  # heads on this rank
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        h, n_all = config.hidden_size, config.num_attention_heads
        d_nope, d_rope, d_v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim

        duplicated = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
                          skip_weight_param_allocation=False, is_expert=False)
        column = dict(config=config, init_method=config.init_method, gather_output=False, bias=False,
                      skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        if mla.q_lora_rank is None:
            self.linear_q_proj = build_module(submodules.linear_q_proj, h, n_all * mla.qk_head_dim,
                                              tp_comm_buffer_name="q_proj", **column)
        else:
            self.linear_q_down_proj = build_module(submodules.linear_q_down_proj, h, mla.q_lora_rank,
                                                   tp_comm_buffer_name="q_down_proj", **duplicated)
            self.q_layernorm = build_module(submodules.q_layernorm, config=config, hidden_size=mla.q_lora_rank,
                                            eps=LATENT_NORM_EPS)
            self.linear_q_up_proj = build_module(submodules.linear_q_up_proj, mla.q_lora_rank,
                                                 n_all * mla.qk_head_dim, tp_comm_buffer_name="q_up_proj", **column)
        self.linear_kv_down_proj = build_module(submodules.linear_kv_down_proj, h, mla.kv_lora_rank + d_rope,
                                                tp_comm_buffer_name="kv_down_proj", **duplicated)
        self.kv_layernorm = build_module(submodules.kv_layernorm, config=config, hidden_size=mla.kv_lora_rank,
                                         eps=LATENT_NORM_EPS)
        self.linear_kv_up_proj = build_module(submodules.linear_kv_up_proj, mla.kv_lora_rank,
                                              n_all * (d_nope + d_v), tp_comm_buffer_name="kv_up_proj", **column)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attn_mask_type=attn_mask_type, attention_type="self",
                                           attention_dropout=mla.attention_dropout,
                                           softmax_scale=mla.softmax_scale(), k_channels=mla.qk_head_dim,
                                           v_channels=d_v, pg_collection=pg)
        self.linear_proj = build_module(submodules.linear_proj, n_all * d_v, h, config=config,
                                        init_method=config.output_layer_init_method, bias=False,
                                        input_is_parallel=True, skip_bias_add=True, is_expert=False,
                                        tp_comm_buffer_name="proj", tp_group=self.tp_group)
        self.rotary = RotaryEmbedding(mla)

    # ---- the projections ---------------------------------------------------------------------------
    def _norm_up(self, q_latent: Optional[torch.Tensor], kv_latent: torch.Tensor):
        """Latent RMSNorms + up-projections (the recomputed part). [s', b, r] -> [s, b, n*d]."""
        q = None
        if q_latent is not None:
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_latent))   # [s, b, n*(d_h+d_h^R)]  eqs. 7-8
        kv, _ = self.linear_kv_up_proj(self.kv_layernorm(kv_latent))  # [s, b, n*(d_h+d_v)]    eqs. 2, 5
        return q, kv

    def qkv(self, hidden_states: torch.Tensor, rope_angles: Optional[torch.Tensor] = None):
        """hidden [s', b, h] (s' = s/tp under sequence parallel) -> q, k [s, b, n, d_h+d_h^R], v [s, b, n, d_v].
        rope_angles [s, b|1, 1, d_h^R/2] (RotaryEmbedding.angles); None: positions 0..s-1."""
        return self._qkv(hidden_states, rope_angles)[0]

    def _qkv(self, hidden_states: torch.Tensor, rope_angles: Optional[torch.Tensor] = None):
        """-> ((q, k, v), recipe): recipe is None, or with the up-projection recompute on, the (function, inputs)
        that make q, k, v again (forward() keeps the attention core from storing them: section 3.2.2)."""
        mla = self.mla
        d_rope = mla.qk_rope_head_dim

        # down-projections on this rank's tokens
        q_latent = q_direct = None
        kv_combined, _ = self.linear_kv_down_proj(hidden_states)               # [s', b, kv_lora + d_h^R]  eq. 1, 3
        kv_latent, k_rope = torch.split(kv_combined, [mla.kv_lora_rank, d_rope], dim=-1)
        if mla.q_lora_rank is not None:
            q_latent, _ = self.linear_q_down_proj(hidden_states)               # [s', b, q_lora]  eq. 6
        else:
            q_direct, _ = self.linear_q_proj(hidden_states)                    # [s, b, n*(d_h+d_h^R)]
        # k^R leaves the duplicated region into per-rank heads: each rank's gradient covers its heads only,
        # so the backward must sum over TP (the column-parallel up-projections do the same for the latents)
        if self.sequence_parallel:
            k_rope = gather_from_sequence_parallel_region(k_rope, group=self.tp_group)  # [s, b, d_h^R]
        elif self.tp_size > 1:
            k_rope = copy_to_tensor_model_parallel_region(k_rope, group=self.tp_group)   # backward: all-reduce

        s, b = k_rope.shape[:2]
        dtype = kv_latent.dtype
        if rope_angles is None:
            cos, sin = self.rotary.cos_sin(s, kv_latent.device, dtype)         # [s, 1, 1, d_h^R/2]
        else:
            if rope_angles.dim() != 4 or rope_angles.shape[0] != s or rope_angles.shape[1] not in (1, b) \
                    or rope_angles.shape[2:] != (1, d_rope // 2):
                raise ValueError(f"MLASelfAttention: rope angles (rotary_pos_emb) must be [s={s}, b={b} or 1, 1, "
                                 f"qk_rope_head_dim/2={d_rope // 2}], got {tuple(rope_angles.shape)}")
            cos, sin = self.rotary.cos_sin_from_angles(rope_angles, dtype)     # [s, b|1, 1, d_h^R/2]
        inputs = (q_latent, kv_latent, k_rope, cos, sin, q_direct)
        if mla.recompute_up_proj and torch.is_grad_enabled():
            # only the latents (and k^R, the angles) are kept: the latent norms, up-projections and the assembly
            # run again in backward (non-reentrant checkpoint); forward() keeps q, k, v out of the attention core
            return checkpoint(self._up_and_assemble, *inputs, use_reentrant=False), inputs
        return self._up_and_assemble(*inputs), None

    def _up_and_assemble(self, q_latent, kv_latent, k_rope, cos, sin, q_direct):
        """Latents -> q, k [s, b, n, d_h+d_h^R], v [s, b, n, d_v] (the part section 3.2.2 recomputes)."""
        mla, n = self.mla, self.num_heads
        q, kv = self._norm_up(q_latent, kv_latent)
        if q is None:
            q = q_direct
        s, b = q.shape[:2]
        # eqs. 3-5, 8-9: query [q^C | RoPE(q^R)], key [k^C | RoPE(k^R) shared by all heads], value v; one fused
        # pass on CUDA (mla/kernels.py), the plain-torch reference elsewhere
        return assemble_qkv(q.view(s, b, n, mla.qk_head_dim), kv.view(s, b, n, mla.qk_nope_head_dim + mla.v_head_dim),
                            k_rope, cos, sin, mla.qk_nope_head_dim, self.rotary.interleaved)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                key_value_states=None, inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, attention_bias=None, packed_seq_params=None, sequence_len_offset=None,
                position_ids: Optional[torch.Tensor] = None, **kwargs):
        """hidden [s', b, h] -> (out [s', b, h], bias None). Positions 0..s-1, or as rotary_pos_emb's rope angles
        [s, b, 1, d_h^R/2] (what the model passes), or position_ids [b, s] (converted here: direct use)."""
        if rotary_pos_cos is not None or rotary_pos_sin is not None:
            raise ValueError("MLASelfAttention takes positions as rope angles in rotary_pos_emb "
                             "(RotaryEmbedding.angles), not rotary_pos_cos/rotary_pos_sin")
        if position_ids is not None:
            if rotary_pos_emb is not None:
                raise ValueError("MLASelfAttention: give position_ids or rotary_pos_emb, not both")
            rotary_pos_emb = self.rotary.angles(position_ids.to(hidden_states.device))
        if key_value_states is not None:
            raise ValueError("MLASelfAttention is self-attention: key_value_states must be None")
        if inference_context is not None:
            raise NotImplementedError("MLASelfAttention: megatron-core inference contexts are not supported")
        if packed_seq_params is not None:
            raise NotImplementedError("MLASelfAttention: packed sequences are not supported yet")
        (query, key, value), recipe = self._qkv(hidden_states, rotary_pos_emb)
        # [s, b, n, d] x3 -> [s, b, n*d_v]                                       eq. 10
        with (nullcontext() if recipe is None else RecomputedQKV(self._up_and_assemble, recipe,
                                                                 (query, key, value)).hooks()):
            out = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                      attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        return self.linear_proj(out)                                            # eq. 11: ([s', b, h], bias)
