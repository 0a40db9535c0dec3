"""The DeepSeek-V3 language model composed from megatron-core parts (not GPTModel, which megatron-core
0.19 deprecates): LanguageModelEmbedding (no position embedding: MLA applies its own rope), TransformerBlock
(our layer specs), an untied ColumnParallelLinear output head, vocab-parallel cross entropy, and MTP.

Pipeline parallelism: the embedding lives on the first stage; the final RMSNorm, output head and the MTP
modules on the last one. MTP needs the embedding of future tokens on the last stage, so that stage keeps a
copy of the word embeddings tied to the first stage's through megatron-core's embedding group, exactly as
GPTModel does for MTP: LanguageModule.setup_embeddings_and_output_layer zero-fills the copy and all-reduces it
over the embedding group at construction (so both start equal), and finalize_model_grads all-reduces its
gradient with the first stage's every step (it asks shared_embedding_or_output_weight(), which returns the
embedding weight on both stages, because TransformerConfig.mtp_num_layers is set). The copy is named
embedding.word_embeddings.weight on the last stage too; checkpoints store it once (sharded_state_dict ties it).

Forward follows GPTModel: logits [b, s, V/tp] (V/tp: parallel_output; all of V with gather) without labels,
the per-token main loss [b, s] with labels. With labels and MTP on, the MTP loss lambda/D sum_k L^k rides
along in backward (mtp/module.py).

Positions: position_ids [b, s] (packed documents, Megatron-LM's --reset-position-ids) become rope angles once
per forward (mla/rope.py RotaryEmbedding.angles, [s, b, 1, d_h^R/2] float32) and reach every MLA layer, the MTP
layers' too, as megatron-core's `rotary_pos_emb` (the argument TransformerBlock forwards on every path,
full-layer recompute included). Each pipeline stage computes them from the position_ids it is given; without
position_ids the positions are 0..s-1. MTP depth k at position i attends with position i's angles, as the main
model (and megatron-core's MTP, which rolls position_ids only for learned position embeddings).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage, is_vp_first_stage, is_vp_last_stage
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_dsv3.compat import get_process_group_collection
from megatron_dsv3.cross_entropy import vocab_parallel_cross_entropy
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.embedding_grad import VocabParallelEmbeddingRowGrad
from megatron_dsv3.mla.rope import RotaryEmbedding
from megatron_dsv3.fused_wgrad import OutputHead
from megatron_dsv3.specs import check_backend, get_decoder_block_spec, get_mtp_block_spec

__all__ = ["DSV3Model", "build_model"]


def _pg_rank(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


class DSV3Model(LanguageModule):
    """Parameter names: embedding.word_embeddings.weight [V/tp, h], decoder.layers.{i}.*,
    decoder.final_layernorm.weight, output_layer.weight [V/tp, h], mtp.layers.{k}.* (interfaces.md)."""

    # the word embedding's gradient added row by row into its buffer (embedding_grad.py) instead of made dense: the
    # 4-layer stack on the H200 160.2 vs 161.45 ms (bench_stack, 4 rounds, 2026-11-30), the same peak memory, no
    # 1.85 GB transient, and deterministic (no atomics)
    embedding_row_grad = True

    def __init__(self, config: DSV3Config, pre_process: bool = True, post_process: bool = True,
                 backend: str = "local", pg_collection=None, vp_stage: Optional[int] = None,
                 parallel_output: bool = True, transformer_config=None, placement=None, shared_embedding=None):
        """placement (pipeline/megatron_schedule.py ChunkPlacement): DualPipe(V)'s chunk, which holds the decoder
        layers placement.layers of the whole model (numbered globally) instead of megatron-core's PP/VPP slice.
        shared_embedding: the embedding module of this rank's first-stage chunk, used by MTP instead of a tied
        copy (not registered here: its parameters and gradients are that chunk's)."""
        check_backend(backend)   # context parallelism: refused by ParallelConfig
        pg_collection = get_process_group_collection(pg_collection)
        tc = transformer_config if transformer_config is not None else config.to_transformer_config()
        if placement is not None:
            tc = copy.copy(tc)
            tc.pipeline_model_parallel_layout = placement.layers   # megatron-core's layer offset / count seam
        super().__init__(config=tc, pg_collection=pg_collection)
        self.dsv3_config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = False   # DeepSeek-V3's head is untied
        self.model_type = ModelType.encoder_or_decoder      # read by megatron-core's schedules
        self.vocab_size = config.padded_vocab_size
        self.max_sequence_length = config.max_position_embeddings
        # MTP sits with the output head (megatron-core's default placement: the last pipeline stage)
        self.mtp_process = post_process and config.mtp.num_layers > 0
        self.rope = RotaryEmbedding(config.mla)   # position_ids -> rope angles (no parameters)
        self.placement = placement
        object.__setattr__(self, "_shared_embedding", shared_embedding if self.mtp_process else None)

        if self.pre_process or (self.mtp_process and self._shared_embedding is None):
            self.embedding = LanguageModelEmbedding(
                config=tc, vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
                position_embedding_type="none", tp_group=pg_collection.tp)
            if self.embedding_row_grad:
                # the same module, whose lookup adds its weight gradient row by row into the buffer
                self.embedding.word_embeddings.__class__ = VocabParallelEmbeddingRowGrad

        if placement is None:
            spec = get_decoder_block_spec(config, backend, vp_stage=vp_stage, pg_collection=pg_collection,
                                          pp_rank=_pg_rank(pg_collection.pp))
        else:
            spec = get_decoder_block_spec(config, backend, all_layers=True, pg_collection=pg_collection)
            first, n = placement.layers.first, placement.layers.count
            spec = dataclasses.replace(spec, layer_specs=spec.layer_specs[first:first + n])
        self.decoder = TransformerBlock(
            config=tc, spec=spec,
            pre_process=pre_process, post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)

        if self.mtp_process:
            self.mtp = build_module(get_mtp_block_spec(config, backend, pg_collection), config=tc, pg_collection=pg_collection,
                                    vp_stage=vp_stage)

        if self.post_process:
            self.output_layer = OutputHead(
                tc.hidden_size, self.vocab_size, config=tc, init_method=tc.init_method, bias=False,
                skip_bias_add=False, gather_output=not parallel_output, tp_group=pg_collection.tp)

        if placement is not None:
            # no tied copy across ranks (MTP shares this rank's embedding): only the markers of
            # setup_embeddings_and_output_layer. DualPipe's second copy of a stage counts once in the grad norm.
            if self.pre_process:
                self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
            if self.post_process:
                self.output_layer.weight.is_embedding_or_output_parameter = True
            if placement.mirror:
                for p in self.parameters():
                    p.shared = True
        elif self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()
        if self.embedding_row_grad and (self.pre_process or (self.mtp_process and self._shared_embedding is None)):
            # megatron-core marks an embedding used twice on one stage (the decoder's input and MTP's) with
            # zero_out_wgrad: DDP's hook then adds whatever gradient arrives, so a layer that accumulated into
            # main_grad must hand over zeros. Every use of this weight is our row-by-row lookup, which always hands
            # over megatron's dummy with grad_added_to_main_grad set, so the hook must skip it, as for the linears
            self.embedding.word_embeddings.weight.zero_out_wgrad = False

    # ---- pipeline plumbing -----------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's schedules with the previous stage's output."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "DSV3Model takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Optional[Tensor]:
        """The weight megatron-core keeps in sync between the first and last stage: the word embeddings
        (first stage, and the last stage's copy used by MTP); the untied head is never shared."""
        if self.pre_process or (self.mtp_process and self._shared_embedding is None):
            return self.embedding.word_embeddings.weight
        return None

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """labels [b, s], logits [s, b, V/tp] -> per-token loss [b, s]. Our forward and MTP compute the loss from
        logits that nothing else reads, so on CUDA the fused kernels take them over (cross_entropy.py: the
        gradient is written over them in forward; no float32 copy); elsewhere megatron-core's cross entropy."""
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp,
                                            consume_logits=True)                                 # [s, b]
        return loss.transpose(0, 1).contiguous()

    # ---- MTP switches (see megatron_dsv3.mtp.loss for the model-chunk versions) -------------------
    def set_mtp_loss_weight(self, weight: float) -> None:
        if self.mtp_process:
            self.mtp.loss_weight = float(weight)

    def set_mtp_enabled(self, enabled: bool) -> None:
        if self.mtp_process:
            self.mtp.enabled = bool(enabled)

    def mtp_loss_report(self, reset: bool = True, group=None) -> dict:
        return self.mtp.loss_report(reset=reset, group=group) if self.mtp_process else {}

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, decoder_input: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, loss_mask: Optional[Tensor] = None,
                inference_context=None, packed_seq_params=None, runtime_gather_output: Optional[bool] = None,
                **kwargs) -> Tensor:
        """input_ids, labels, loss_mask [b, s] (labels[i] = t_{i+1}); attention_mask: None (causal) or
        megatron's boolean [b|1, 1, s, s], True = masked. Returns per-token loss [b, s] with labels, logits
        [b, s, V/tp] without (all of V with runtime_gather_output=True); on a non-last pipeline stage the
        hidden states [s', b, h]. position_ids [b, s]: the rope positions (None: 0..s-1); every pipeline stage
        needs the same ones. Under pipeline parallelism with MTP the last stage needs input_ids too."""
        rope_angles = self._rope_angles(input_ids, position_ids)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)   # [s', b, h]
        # non-first stages: the decoder reads the tensor given to set_input_tensor
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rope_angles,
                              inference_context=inference_context, packed_seq_params=packed_seq_params)
        if not self.post_process:
            return hidden
        return self._head(hidden, input_ids, labels, loss_mask, attention_mask, rope_angles, runtime_gather_output)

    def _rope_angles(self, input_ids: Optional[Tensor], position_ids: Optional[Tensor]) -> Optional[Tensor]:
        if position_ids is None:
            return None
        if input_ids is not None and tuple(position_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"DSV3Model: position_ids must have input_ids' shape [b, s] "
                             f"{tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
        return self.rope.angles(position_ids)                                         # [s, b, 1, d_h^R/2]

    def _head(self, hidden: Tensor, input_ids, labels, loss_mask, attention_mask, rope_angles,
              runtime_gather_output) -> Tensor:
        """The last stage after the final norm: MTP (with labels), the output head, the loss (with labels)."""
        if labels is not None and self.mtp_process and self.mtp.enabled:
            if input_ids is None:
                raise ValueError("DSV3Model: MTP embeds future tokens, so the last pipeline stage needs input_ids "
                                 "(not only labels); pass them there or switch MTP off (set_mtp_enabled)")
            hidden = self.mtp(
                hidden, input_ids=input_ids, labels=labels, loss_mask=loss_mask,
                embedding=lambda ids: (self.embedding if self._shared_embedding is None else self._shared_embedding)(
                    input_ids=ids, position_ids=None),
                output_layer=lambda h: self.output_layer(h, runtime_gather_output=False),
                loss_fn=self.compute_language_model_loss, attention_mask=attention_mask, rope_angles=rope_angles,
                per_token_loss=bool(self.config.calculate_per_token_loss))

        if labels is None:
            logits, _ = self.output_layer(hidden, runtime_gather_output=runtime_gather_output)  # [s, b, V/tp]
            return logits.transpose(0, 1).contiguous()                                       # [b, s, V/tp]
        logits, _ = self.output_layer(hidden, runtime_gather_output=False)
        return self.compute_language_model_loss(labels, logits)                              # [b, s]

    # ---- DualPipe's overlapped forward & backward (pipeline/overlap.py) ---------------------------
    def supports_overlap(self) -> bool:
        """Whether overlap_pieces() splits this chunk: some decoder layer has Figure 4's sub-stages, and nothing
        megatron-core wraps around the whole layer loop (full-layer recompute, TE's FP8/FP4 contexts, CPU
        offloading, sequence parallelism's RNG fork with dropout) is in use."""
        from megatron_dsv3.pipeline.overlap import layer_stages
        tc = self.config
        if (tc.recompute_granularity == "full" or tc.fp8 or getattr(tc, "fp4", None)
                or getattr(tc, "cpu_offloading", False)
                or (tc.sequence_parallel and (tc.hidden_dropout or tc.attention_dropout))):
            return False
        return any(layer_stages(layer) is not None for layer in self.decoder.layers)

    def overlap_pieces(self, input_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, decoder_input: Optional[Tensor] = None,
                       labels: Optional[Tensor] = None, loss_mask: Optional[Tensor] = None,
                       inference_context=None, packed_seq_params=None, runtime_gather_output: Optional[bool] = None,
                       **kwargs):
        """forward(same arguments) as overlap.py's pieces, for DualPipe's overlapped F&B: the embedding (first
        stage, takes nothing), each decoder layer (its LayerStages where it has sub-stages, else one piece),
        final norm + MTP + head + loss (last stage); a non-first stage's first piece takes the stage input (the
        tensor forward() would read from set_input_tensor). Returns forward()'s result from the last piece. None
        where forward() cannot be split: supports_overlap() is False, or inference, packed sequences, a given
        decoder_input."""
        from megatron_dsv3.pipeline.overlap import layer_piece
        if (not self.supports_overlap() or inference_context is not None or packed_seq_params is not None
                or decoder_input is not None or kwargs):
            return None
        rope_angles = self._rope_angles(input_ids, position_ids)
        layer_kw = dict(attention_mask=attention_mask, rotary_pos_emb=rope_angles)   # as TransformerBlock's loop
        pieces = []
        if self.pre_process:
            pieces.append(lambda: self.embedding(input_ids=input_ids, position_ids=None))          # [s', b, h]
        pieces += [layer_piece(layer, **layer_kw) for layer in self.decoder.layers]
        if self.post_process:
            norm = self.decoder.final_layernorm
            pieces.append(lambda h: self._head(h if norm is None else norm(h), input_ids, labels, loss_mask,
                                               attention_mask, rope_angles, runtime_gather_output))
        return pieces

    # ---- checkpointing ---------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """LanguageModule's, with the last stage's embedding copy stored as a replica of the first stage's."""
        from megatron.core.transformer.multi_token_prediction import tie_word_embeddings_state_dict
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # megatron-core >= 0.19's LanguageModule ties an MTP stage's embedding copy itself, reading self.embedding,
        # which a DualPipe chunk sharing its rank's embedding does not have; the tie is done once, below, for
        # every version
        mtp_process = self.mtp_process
        object.__setattr__(self, "mtp_process", False)
        try:
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            object.__setattr__(self, "mtp_process", mtp_process)
        sd.pop(f"{prefix}output_layer._extra_state", None)
        if self.placement is not None and self.placement.mirror:
            _second_replica(sd)           # DualPipe's mirror copy: the stage's main replica is on the other rank
        if self.mtp_process and not self.pre_process and self._shared_embedding is None:
            tie_word_embeddings_state_dict(sd, self.embedding.word_embeddings.weight,
                                           f"{prefix}embedding.word_embeddings.weight", tp_group=self.tp_group,
                                           dp_cp_group=metadata["dp_cp_group"])
        return sd


def _second_replica(sd) -> None:
    """Mark every sharded tensor/object of a state dict as a non-main replica (replica_id's first entry + 1)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    for v in nested_values(sd):
        rid = getattr(v, "replica_id", None)
        if rid is None:
            continue
        v.replica_id = (rid[0] + 1, *rid[1:]) if isinstance(rid, tuple) else rid + 1


def _check_groups(config: DSV3Config, pg) -> None:
    """The process groups must have the sizes ParallelConfig says (megatron-core's layers shard by the groups,
    its TransformerConfig by the config: a mismatch builds a model that silently computes something else)."""
    par = config.parallel
    for field, group in (("tensor_model_parallel_size", "tp"), ("pipeline_model_parallel_size", "pp"),
                         ("expert_model_parallel_size", "ep")):
        g = getattr(pg, group, None)
        size = g.size() if g is not None and torch.distributed.is_initialized() else 1
        if size != getattr(par, field):
            raise ValueError(f"ParallelConfig.{field} is {getattr(par, field)} but the {group} process group has "
                             f"{size} ranks (initialise megatron-core's parallel_state with the config's sizes)")


def _model_device(device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _allocation_only(tc, device: torch.device):
    """A copy of the TransformerConfig with which megatron-core's parts only allocate, on `device`: without
    use_cpu_initialization they allocate on torch.cuda.current_device() (megatron_dsv3.mcore_cpu maps that to
    the CPU on a CPU-only torch), so the flag follows the device."""
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        raise ValueError(f"build_model(device={device}): megatron-core allocates on torch.cuda.current_device() "
                         f"(cuda:{torch.cuda.current_device()}); call torch.cuda.set_device({device}) first")
    tc = copy.copy(tc)
    tc.perform_initialization = False
    tc.use_cpu_initialization = device.type == "cpu"
    return tc


def _mark_tensor_parallel_weights(model) -> None:
    """megatron-core (0.16.1) sets `tensor_model_parallel` / `partition_dim` / `partition_stride` on the weights of
    its tensor-parallel layers inside their random init, so with perform_initialization=False they stay unset (the
    gradient-norm clipping counts a weight without them once per TP group, as a duplicate): set them as that
    init would: stride 1, except megatron's MLP builds a gated (GLU) linear_fc1 with stride 2 ([gate_r; up_r] per
    TP rank); megatron-core 0.19 sets them itself."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)
    from megatron.core.transformer.mlp import MLP
    glu_fc1 = {id(m.linear_fc1.weight) for m in model.modules() if isinstance(m, MLP)
               and m.config.gated_linear_unit and isinstance(getattr(m.linear_fc1, "weight", None), torch.nn.Parameter)}
    for m in model.modules():
        dim = 0 if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) else \
            1 if isinstance(m, RowParallelLinear) else None
        w = getattr(m, "weight", None)
        if dim is not None and isinstance(w, torch.nn.Parameter) and not hasattr(w, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(w, is_parallel=True, dim=dim, stride=2 if id(w) in glu_fc1 else 1)


def build_model(config: DSV3Config, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                backend: str = "local", pg_collection=None, vp_stage: Optional[int] = None,
                device=None, init: bool = True, seed: Optional[int] = None, transformer_config=None,
                **kwargs) -> DSV3Model:
    """One model chunk for this rank. pre/post_process default to whether this rank (and vp_stage) is the
    first/last pipeline stage of pg_collection.pp (megatron-core's parallel_state groups by default).
    Usable as megatron's model_provider: build_model(cfg, pre_process=..., post_process=..., vp_stage=...).

    Every tensor is allocated on `device` (default: the current CUDA device, else the CPU) and initialised
    there by megatron_dsv3.init.init_weights (the paper's init, the same values whatever the parallel layout)
    from `seed` (default: torch.initial_seed(), the seed torch.manual_seed last set; pass the run's seed where
    the torch seed is offset per rank, as Megatron-LM's seeding does per pipeline stage). init=False leaves
    the tensors uninitialised (for a caller that loads every one, as the converter does). megatron-core's own
    init never runs: transformer_config (default config.to_transformer_config()) is copied with
    perform_initialization=False and use_cpu_initialization set by the device."""
    pg = get_process_group_collection(pg_collection)
    _check_groups(config, pg)
    vp_size = config.parallel.virtual_pipeline_model_parallel_size
    if pre_process is None:
        pre_process = is_pp_first_stage(pg.pp) and is_vp_first_stage(vp_stage, vp_size)
    if post_process is None:
        post_process = is_pp_last_stage(pg.pp) and is_vp_last_stage(vp_stage, vp_size)
    device = _model_device(device)
    tc = transformer_config if transformer_config is not None else config.to_transformer_config()
    with torch.device(device):   # our modules allocate on the default device, megatron-core's as _allocation_only
        model = DSV3Model(config, pre_process=pre_process, post_process=post_process, backend=backend,
                          pg_collection=pg, vp_stage=vp_stage, transformer_config=_allocation_only(tc, device),
                          **kwargs)
    _mark_tensor_parallel_weights(model)
    if config.fp8.enabled:
        from megatron_dsv3.fp8.weight_cache import configure
        configure(model, config.fp8)                # FP8Config.weight_cache on the FP8 modules
    # megatron-core's LanguageModule moves the last stage's embedding copy (MTP, PP > 1) to CUDA whatever the
    # allocation device: bring it back before drawing (CPU and CUDA generators draw different numbers)
    model.to(device)
    if init:
        from megatron_dsv3.init import init_weights
        dp_cp = getattr(pg, "dp_cp", None)
        init_weights(model, config, torch.initial_seed() if seed is None else seed,
                     metadata={"dp_cp_group": dp_cp} if dp_cp is not None else None)
    return model
