"""Hugging Face DeepSeek-V2/V3 names <-> megatron_dsv3 names: THE table, and how each tensor is split.

Reading the table: one row per tensor of our model. `hf` names the Hugging Face tensor(s) it is made of
(relative to the row's prefix), `ours` our parameter (same prefix rules), `split` how tensor parallel
(TP) ranks share it, `fp8` whether published FP8 checkpoints store it as e4m3 + 128x128 block scales,
`when` which models have it, `shape` the HF tensor's shape from the config (checked on import).

Prefixes:      HF                              ours (global layer index; PP stages number locally)
  TOP          (none)                          (none)
  LAYER        model.layers.{i}.               decoder.layers.{i}.                    i < num_layers
               model.layers.{L+k}.             mtp.layers.{k}.transformer_layer.      the MTP block, k < D
  MTP          model.layers.{L+k}.             mtp.layers.{k}.
HF's `model.layers.{L+k}.embed_tokens.weight` and `.shared_head.head.weight` are copies of the main
embedding and head (MTP_SHARED): written on export as the published checkpoint does, checked on import.

Pipeline stage ownership (DSV3Config.pipeline_layers()): layer i belongs to the stage whose layer range
holds it (with virtual stages, to the chunk whose TransformerLayer has layer_number i + 1: the converter
reads the global index from the model); the embedding to the first stage (and, when MTP is on, a copy on
the last stage, which embeds the MTP inputs); final norm, output head and all MTP rows to the last stage.
Expert parallel (EP): expert g lives on EP rank g // E_local as local expert g % E_local.
Expert tensor parallel > 1 is not supported (experts are whole on their EP rank).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# ---- how a tensor is split over TP ranks -----------------------------------------------------------
REPLICATED = "replicated"   # every TP rank holds all of it
COLUMN = "column"           # dim 0 (output features) in TP contiguous parts; heads are head-major
ROW = "row"                 # dim 1 (input features) in TP contiguous parts
VOCAB = "vocab"             # dim 0, after zero-padding the vocabulary to the model's padded size
GLU = "glu"                 # HF (gate, up) -> TP rank r holds [gate_r; up_r] (megatron's SwiGLU fc1)
EXPERT_FC1 = "expert_fc1"   # HF experts.{g}.(gate, up) -> weight1[e] = [gate.T | up.T]   [E_local, h, 2f]
EXPERT_FC2 = "expert_fc2"   # HF experts.{g}.down       -> weight2[e] = down.T            [E_local, f, h]


@dataclass(frozen=True)
class Entry:
    hf: Tuple[str, ...]
    ours: str
    split: str
    fp8: bool
    when: str                    # "all" | "q_lora" | "no_q_lora" | "dense" | "moe" | "shared" | "bias"
    shape: Callable              # (cfg) -> HF tensor shape (every tensor of `hf`; experts: one expert's)
    dtype: Optional[torch.dtype] = None  # stored in this dtype whatever the export dtype (published: bias F32)


def _h(c): return c.hidden_size
def _H(c): return c.num_attention_heads


TOP: List[Entry] = [
    Entry(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", VOCAB, False, "all",
          lambda c: (c.vocab_size, _h(c))),
    Entry(("model.norm.weight",), "decoder.final_layernorm.weight", REPLICATED, False, "all", lambda c: (_h(c),)),
    Entry(("lm_head.weight",), "output_layer.weight", VOCAB, False, "all", lambda c: (c.vocab_size, _h(c))),
]

LAYER: List[Entry] = [
    Entry(("input_layernorm.weight",), "input_layernorm.weight", REPLICATED, False, "all", lambda c: (_h(c),)),
    # MLA (DeepSeek-V2 eq. 9-18): down-projections replicated, up-projections split by heads
    Entry(("self_attn.q_a_proj.weight",), "self_attention.linear_q_down_proj.weight", REPLICATED, True, "q_lora",
          lambda c: (c.mla.q_lora_rank, _h(c))),
    Entry(("self_attn.q_a_layernorm.weight",), "self_attention.q_layernorm.weight", REPLICATED, False, "q_lora",
          lambda c: (c.mla.q_lora_rank,)),
    Entry(("self_attn.q_b_proj.weight",), "self_attention.linear_q_up_proj.weight", COLUMN, True, "q_lora",
          lambda c: (_H(c) * c.mla.qk_head_dim, c.mla.q_lora_rank)),
    Entry(("self_attn.q_proj.weight",), "self_attention.linear_q_proj.weight", COLUMN, True, "no_q_lora",
          lambda c: (_H(c) * c.mla.qk_head_dim, _h(c))),
    Entry(("self_attn.kv_a_proj_with_mqa.weight",), "self_attention.linear_kv_down_proj.weight", REPLICATED, True,
          "all", lambda c: (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim, _h(c))),
    Entry(("self_attn.kv_a_layernorm.weight",), "self_attention.kv_layernorm.weight", REPLICATED, False, "all",
          lambda c: (c.mla.kv_lora_rank,)),
    Entry(("self_attn.kv_b_proj.weight",), "self_attention.linear_kv_up_proj.weight", COLUMN, True, "all",
          lambda c: (_H(c) * (c.mla.qk_nope_head_dim + c.mla.v_head_dim), c.mla.kv_lora_rank)),
    Entry(("self_attn.o_proj.weight",), "self_attention.linear_proj.weight", ROW, True, "all",
          lambda c: (_h(c), _H(c) * c.mla.v_head_dim)),
    Entry(("post_attention_layernorm.weight",), "pre_mlp_layernorm.weight", REPLICATED, False, "all",
          lambda c: (_h(c),)),
    # dense SwiGLU MLP (the first k layers)
    Entry(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", GLU, True, "dense",
          lambda c: (c.moe.dense_ffn_hidden_size, _h(c))),
    Entry(("mlp.down_proj.weight",), "mlp.linear_fc2.weight", ROW, True, "dense",
          lambda c: (_h(c), c.moe.dense_ffn_hidden_size)),
    # DeepSeekMoE (V3 eq. 12-16): router, bias b_i, shared and routed experts
    Entry(("mlp.gate.weight",), "mlp.router.weight", REPLICATED, False, "moe", lambda c: (c.moe.num_experts, _h(c))),
    Entry(("mlp.gate.e_score_correction_bias",), "mlp.router.expert_bias", REPLICATED, False, "bias",
          lambda c: (c.moe.num_experts,), torch.float32),
    Entry(("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
          "mlp.shared_experts.linear_fc1.weight", GLU, True, "shared",
          lambda c: (c.moe.num_shared_experts * c.moe.expert_ffn_hidden_size, _h(c))),
    Entry(("mlp.shared_experts.down_proj.weight",), "mlp.shared_experts.linear_fc2.weight", ROW, True, "shared",
          lambda c: (_h(c), c.moe.num_shared_experts * c.moe.expert_ffn_hidden_size)),
    Entry(("mlp.experts.{g}.gate_proj.weight", "mlp.experts.{g}.up_proj.weight"), "mlp.experts.weight1",
          EXPERT_FC1, True, "moe", lambda c: (c.moe.expert_ffn_hidden_size, _h(c))),
    Entry(("mlp.experts.{g}.down_proj.weight",), "mlp.experts.weight2", EXPERT_FC2, True, "moe",
          lambda c: (_h(c), c.moe.expert_ffn_hidden_size)),
]

MTP: List[Entry] = [
    Entry(("enorm.weight",), "enorm.weight", REPLICATED, False, "all", lambda c: (_h(c),)),
    Entry(("hnorm.weight",), "hnorm.weight", REPLICATED, False, "all", lambda c: (_h(c),)),
    # input = cat(enorm(emb), hnorm(h)); megatron's eh_proj is column-parallel, gathered after (BF16 when published)
    Entry(("eh_proj.weight",), "eh_proj.weight", COLUMN, False, "all", lambda c: (_h(c), 2 * _h(c))),
    Entry(("shared_head.norm.weight",), "final_layernorm.weight", REPLICATED, False, "all", lambda c: (_h(c),)),
]

# HF copies inside each MTP layer of main-model tensors: {MTP-relative HF name: main HF name}
MTP_SHARED: Dict[str, str] = {"embed_tokens.weight": "model.embed_tokens.weight",
                              "shared_head.head.weight": "lm_head.weight"}


# ---- which rows a model has ------------------------------------------------------------------------
def _applies(entry: Entry, cfg, layer: int) -> bool:
    moe = cfg.is_moe_layer(layer)
    return {"all": True, "q_lora": cfg.mla.q_lora_rank is not None, "no_q_lora": cfg.mla.q_lora_rank is None,
            "dense": not moe, "moe": moe, "shared": moe and cfg.moe.num_shared_experts > 0,
            "bias": moe and cfg.moe.expert_bias}[entry.when]


@dataclass(frozen=True)
class Row:
    """One tensor of our model, globally named, with the HF tensors it is made of."""
    ours: str                    # global name, e.g. decoder.layers.7.mlp.experts.weight1
    entry: Entry
    hf_prefix: str               # e.g. "model.layers.7."
    layer: Optional[int]         # global HF layer index (MTP k: num_layers + k); None for TOP rows

    def hf_names(self, experts: Optional[Sequence[int]] = None) -> List[str]:
        """Concrete HF names; expert rows need the global expert ids (in order: per expert, each of `hf`)."""
        if self.entry.split in (EXPERT_FC1, EXPERT_FC2):
            return [self.hf_prefix + n.format(g=g) for g in experts for n in self.entry.hf]
        return [self.hf_prefix + n for n in self.entry.hf]


def model_tensors(cfg) -> Iterator[Row]:
    """Every tensor of the whole model (all stages, all ranks), in checkpoint order."""
    yield Row(TOP[0].ours, TOP[0], "", None)
    for i in range(cfg.num_layers):
        for e in LAYER:
            if _applies(e, cfg, i):
                yield Row(f"decoder.layers.{i}.{e.ours}", e, f"model.layers.{i}.", i)
    for k in range(cfg.mtp.num_layers):
        i = cfg.num_layers + k
        for e in MTP:
            yield Row(f"mtp.layers.{k}.{e.ours}", e, f"model.layers.{i}.", i)
        for e in LAYER:
            if _applies(e, cfg, i):
                yield Row(f"mtp.layers.{k}.transformer_layer.{e.ours}", e, f"model.layers.{i}.", i)
    for e in TOP[1:]:
        yield Row(e.ours, e, "", None)


def mtp_shared_copies(cfg) -> Dict[str, str]:
    """{HF copy name: main HF name} for the MTP layers' copies of embedding and head."""
    return {f"model.layers.{cfg.num_layers + k}.{rel}": main
            for k in range(cfg.mtp.num_layers) for rel, main in MTP_SHARED.items()}


def expected_hf_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """{HF name: shape} of every tensor a checkpoint of this config holds (FP8 scales not included)."""
    out = {}
    for t in model_tensors(cfg):
        experts = range(cfg.moe.num_experts) if t.entry.split in (EXPERT_FC1, EXPERT_FC2) else None
        for n in t.hf_names(experts):
            out[n] = tuple(t.entry.shape(cfg))
    for copy, main in mtp_shared_copies(cfg).items():
        out[copy] = out[main]
    return out


# ---- local (per-rank) names <-> global names -------------------------------------------------------
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.*)$")


def stage_offsets(cfg) -> List[int]:
    """First global layer of each pipeline stage."""
    offs, acc = [], 0
    for n in cfg.pipeline_layers():
        offs.append(acc)
        acc += n
    return offs


def stage_of_layer(cfg, layer: int) -> int:
    """Pipeline stage owning global layer `layer` (MTP layers: the last stage)."""
    if layer >= cfg.num_layers:
        return cfg.parallel.pipeline_model_parallel_size - 1
    offs = stage_offsets(cfg)
    return max(s for s, o in enumerate(offs) if o <= layer and cfg.pipeline_layers()[s] > 0)


def decoder_layer(local: str) -> Optional[Tuple[int, str]]:
    """"decoder.layers.{i}.rest" -> (i, rest); None for other names."""
    m = _LAYER_RE.match(local)
    return (int(m.group(1)), m.group(2)) if m else None


def global_name(local: str, cfg, pp_rank: int) -> str:
    """decoder.layers.{local}.x on stage pp_rank -> decoder.layers.{global}.x; other names unchanged."""
    m = _LAYER_RE.match(local)
    if m:
        return f"decoder.layers.{stage_offsets(cfg)[pp_rank] + int(m.group(1))}.{m.group(2)}"
    return local


def local_name(global_: str, cfg, pp_rank: int) -> str:
    m = _LAYER_RE.match(global_)
    if m:
        return f"decoder.layers.{int(m.group(1)) - stage_offsets(cfg)[pp_rank]}.{m.group(2)}"
    return global_


def table(cfg) -> Dict[str, Row]:
    """{our global name: Row} for the whole model."""
    return {t.ours: t for t in model_tensors(cfg)}


def local_experts(cfg, ep_rank: int, ep: int) -> range:
    n = cfg.moe.num_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


# ---- split / merge (pure torch; `tensors` are the HF tensors of one row, in `hf_names` order) ------
def shard(split: str, tensors: Sequence[torch.Tensor], rank: int, size: int,
          padded_rows: Optional[int] = None) -> torch.Tensor:
    """The TP rank's part of a non-expert row."""
    if split == REPLICATED:
        return tensors[0]
    if split == COLUMN:
        return tensors[0].chunk(size, 0)[rank]
    if split == ROW:
        return tensors[0].chunk(size, 1)[rank]
    if split == VOCAB:
        t = tensors[0]
        if padded_rows is not None and padded_rows > t.shape[0]:
            t = torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])])
        return t.chunk(size, 0)[rank]
    if split == GLU:
        gate, up = tensors
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
    raise ValueError(f"shard: split {split!r} is per expert, use expert_part")


def merge(split: str, parts: Sequence[torch.Tensor], rows: Optional[int] = None) -> List[torch.Tensor]:
    """Inverse of `shard`: the TP ranks' parts -> the HF tensors of the row (vocab padding cut to `rows`)."""
    if split == REPLICATED:
        return [parts[0]]
    if split == COLUMN:
        return [torch.cat(list(parts), 0)]
    if split == ROW:
        return [torch.cat(list(parts), 1)]
    if split == VOCAB:
        t = torch.cat(list(parts), 0)
        return [t[:rows] if rows is not None else t]
    if split == GLU:
        halves = [p.chunk(2, 0) for p in parts]
        return [torch.cat([g for g, _ in halves], 0), torch.cat([u for _, u in halves], 0)]
    raise ValueError(f"merge: split {split!r} is per expert, use expert_hf")


def expert_part(split: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One expert's HF tensors -> its slice of weight1 [h, 2f] (gate|up, transposed) or weight2 [f, h]."""
    if split == EXPERT_FC1:
        gate, up = tensors                          # [f, h] each
        return torch.cat([gate.t(), up.t()], 1)     # [h, 2f]
    if split == EXPERT_FC2:
        return tensors[0].t()                       # [h, f] -> [f, h]
    raise ValueError(f"expert_part: split {split!r} is not an expert row")


def expert_hf(split: str, part: torch.Tensor) -> List[torch.Tensor]:
    """Inverse of `expert_part`."""
    if split == EXPERT_FC1:
        f = part.shape[1] // 2
        return [part[:, :f].t().contiguous(), part[:, f:].t().contiguous()]
    if split == EXPERT_FC2:
        return [part.t().contiguous()]
    raise ValueError(f"expert_hf: split {split!r} is not an expert row")
