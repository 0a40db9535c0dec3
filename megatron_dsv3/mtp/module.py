"""Multi-Token Prediction modules (DeepSeek-V3 section 2.2, eqs. 21-25).

Depth k = 1..D predicts token t_{i+k+1} at position i:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      (eq. 21; enorm, hnorm, eh_proj)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                              (eq. 22; one MLA + DeepSeekMoE layer)
    P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                          (eq. 23; final_layernorm, shared head)
    L^k = -1/T_k sum_i log P^k_{i+k+1}[t_{i+k+1}]                  (eq. 24; mean over the valid positions)
    L_MTP = lambda/D sum_k L^k                                     (eq. 25)

Design notes:
* The concatenation order is [embedding ; hidden], as in DeepSeek's published checkpoints (eh_proj [h, 2h]).
* h^0 is the main model's output after its final RMSNorm (the tensor its output head reads), as megatron-core,
  vLLM and SGLang feed the published MTP module; h^k for k >= 1 is TRM_k's output before the depth's
  final RMSNorm (eq. 22 literally).
* Embedding and output head are the main model's (passed in at forward time, not owned here).
* Sequence ends: depth k reads the input ids and labels shifted left by k; the last k positions get the
  filler id 0 and loss-mask 0. Attention is causal, so the filler never reaches a valid position.
* The loss goes into the graph with megatron-core's MTPLossAutoScaler: forward returns the main model's
  hidden state unchanged, and backpropagating the main loss also backpropagates lambda/D * L^k (scaled by the
  loss scale megatron's pipeline schedule sets, 1/num_microbatches; default 1). Per-depth values are
  accumulated (detached) for logging: `MTPBlock.loss_report()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch

from megatron.core.tensor_parallel.mappings import (gather_from_tensor_model_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from megatron.core.transformer.module import MegatronModule
# present with the same behaviour in megatron-core 0.16-0.19; its loss scale is set by the pipeline schedules
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_dsv3.compat import get_process_group_collection
from megatron_dsv3.config import MTPConfig

__all__ = ["MTPModuleSubmodules", "MTPModule", "MTPBlockSubmodules", "MTPBlock", "roll_left"]


def roll_left(x: torch.Tensor, fill=0) -> torch.Tensor:
    """[b, s] -> [b, s]: x[:, i + 1] at i, `fill` at the last position (no wrap-around)."""
    return torch.cat((x[:, 1:], torch.full_like(x[:, :1], fill)), dim=1)


def _pg_rank(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


@dataclass
class MTPModuleSubmodules:
    enorm: Union[ModuleSpec, type] = None              # RMSNorm on Emb(t_{i+k})
    hnorm: Union[ModuleSpec, type] = None              # RMSNorm on h^{k-1}_i
    eh_proj: Union[ModuleSpec, type] = None            # M_k: 2h -> h (column-parallel, gathered)
    transformer_layer: Union[ModuleSpec, type] = None  # TRM_k: megatron TransformerLayer (MLA + DeepSeekMoE)
    final_layernorm: Union[ModuleSpec, type] = None    # RMSNorm before the shared output head


class MTPModule(MegatronModule):
    """One MTP depth k: forward(h^{k-1} [s', b, h], emb of t_{i+k} [s', b, h]) -> h^k [s', b, h] (before the
    final RMSNorm). s' = s / tp under sequence parallelism."""

    def __init__(self, config, submodules: MTPModuleSubmodules, depth: int, pg_collection=None, vp_stage=None):
        super().__init__(config=config)
        pg = get_process_group_collection(pg_collection)
        self.depth = depth
        self.tp_group = pg.tp
        self.sequence_parallel = bool(config.sequence_parallel)
        h = config.hidden_size
        norm = dict(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        self.enorm = build_module(submodules.enorm, **norm)
        self.hnorm = build_module(submodules.hnorm, **norm)
        self.eh_proj = build_module(submodules.eh_proj, 2 * h, h, config=config, init_method=config.init_method,
                                    gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                                    tp_comm_buffer_name="mtp_eh_proj", tp_group=self.tp_group)
        # TransformerLayer adds this stage's decoder offset to layer_number: make its global number
        # num_layers + depth (1-based), after the main model's layers
        offset = get_transformer_layer_offset(config, vp_stage, _pg_rank(getattr(pg, "pp", None)))
        self.transformer_layer = build_module(submodules.transformer_layer, config=config,
                                              layer_number=config.num_layers + depth - offset,
                                              pg_collection=pg, vp_stage=vp_stage)
        self.final_layernorm = build_module(submodules.final_layernorm, **norm)

    @property
    def mtp_model_layer(self):
        """megatron-core 0.19's name for the inner layer: its pipeline schedules set per-micro-batch state
        on model.mtp.layers[k].mtp_model_layer. An alias; parameters stay under transformer_layer."""
        return self.transformer_layer

    def forward(self, hidden_states: torch.Tensor, embeddings: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                rope_angles: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rope_angles [s, b, 1, d_h^R/2]: the main model's (position i), None for 0..s-1."""
        # eq. 21: [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]          [s', b, 2h]
        x = torch.cat((self.enorm(embeddings), self.hnorm(hidden_states)), dim=-1)
        x, _ = self.eh_proj(x)                                            # [s, b, h/tp]  (SP: gathered over s)
        x = gather_from_tensor_model_parallel_region(x, group=self.tp_group)  # [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)   # [s/tp, b, h]
        out, _ = self.transformer_layer(x, attention_mask=attention_mask, rotary_pos_emb=rope_angles)  # eq. 22
        return out


@dataclass
class MTPBlockSubmodules:
    layer_specs: List[ModuleSpec] = field(default_factory=list)  # one MTPModule spec per depth


class MTPBlock(MegatronModule):
    """The D sequential MTP modules and their loss (eqs. 24-25). Built on the pipeline stage that has the
    output head (the last one). `loss_weight` is lambda; the trainer sets it from MTPConfig.loss_weight_at()."""

    def __init__(self, config, submodules: MTPBlockSubmodules, mtp: MTPConfig, pg_collection=None, vp_stage=None):
        super().__init__(config=config)
        self.mtp = mtp
        self.layers = torch.nn.ModuleList([
            build_module(spec, config=config, depth=k + 1, pg_collection=pg_collection, vp_stage=vp_stage)
            for k, spec in enumerate(submodules.layer_specs)])
        self.num_depths = len(self.layers)
        self.loss_weight = mtp.loss_weight_at(0)   # lambda
        self.enabled = True                        # False: the model runs without MTP (e.g. inference)
        self._sums: Optional[torch.Tensor] = None  # [D] sum of masked per-token losses since the last report
        self._counts: Optional[torch.Tensor] = None  # [D] number of loss tokens

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                loss_mask: Optional[torch.Tensor], embedding: Callable, output_layer: Callable,
                loss_fn: Callable, attention_mask: Optional[torch.Tensor] = None,
                rope_angles: Optional[torch.Tensor] = None, per_token_loss: bool = False) -> torch.Tensor:
        """hidden_states: h^0 [s', b, h]; input_ids, labels, loss_mask: [b, s] (labels[i] = t_{i+1}).
        embedding(input_ids [b, s]) -> [s', b, h]; output_layer(h [s', b, h]) -> logits [s, b, V/tp];
        loss_fn(labels [b, s], logits) -> per-token loss [b, s]. rope_angles: the main model's (every depth
        attends with position i's rope at position i, as the main model), None for 0..s-1.
        Returns h^0 with lambda/D * sum_k L^k attached for backward (per_token_loss: the sums, not means,
        for megatron's calculate_per_token_loss)."""
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float32)
        mask = loss_mask.float()
        ids, tgt = input_ids, labels
        h_prev = hidden_states
        sums, counts = [], []
        scale = self.loss_weight / self.num_depths
        for layer in self.layers:
            # depth k: the input at position i is t_{i+k}, the target t_{i+k+1}; the last k positions have none
            ids, tgt, mask = roll_left(ids), roll_left(tgt), roll_left(mask)
            h_k = layer(h_prev, embedding(ids), attention_mask, rope_angles)      # [s', b, h]   eqs. 21-22
            logits, _ = output_layer(layer.final_layernorm(h_k))                  # [s, b, V/tp] eq. 23
            loss_sum = (loss_fn(tgt, logits) * mask).sum()                        # eq. 24 (times T_k)
            n = mask.sum()
            sums.append(loss_sum.detach())
            counts.append(n.detach())
            depth_loss = loss_sum if per_token_loss else loss_sum / n.clamp(min=1)
            hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * depth_loss)  # eq. 25 into backward
            h_prev = h_k
        sums, counts = torch.stack(sums), torch.stack(counts)
        self._sums = sums if self._sums is None else self._sums + sums
        self._counts = counts if self._counts is None else self._counts + counts
        return hidden_states

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Each depth's own sharded state dict (TP/EP sharding kept): megatron-core's default recursion would
        treat the ModuleList `layers` as replicated tensors. The block has no tensors of its own."""
        sd = {}
        for k, layer in enumerate(self.layers):
            sd.update(layer.sharded_state_dict(prefix=f"{prefix}layers.{k}.", sharded_offsets=sharded_offsets,
                                               metadata=metadata))
        return sd

    def loss_report(self, reset: bool = True, group=None) -> Dict[int, float]:
        """{depth k: mean L^k} over the tokens of all forwards since the last reset (summed over `group`,
        e.g. the data-parallel group, when given). Empty before any MTP forward."""
        if self._sums is None:
            return {}
        stats = torch.stack((self._sums, self._counts)).double()               # [2, D]
        if group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, group=group)
        if reset:
            self._sums = self._counts = None
        return {k + 1: (stats[0, k] / stats[1, k].clamp(min=1)).item() for k in range(stats.shape[1])}
