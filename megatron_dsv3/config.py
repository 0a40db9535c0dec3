"""Configs: one small frozen dataclass per paper feature, composed by `DSV3Config`.

Every impossible combination raises a `ValueError` naming the fields at construction; nothing
downstream re-validates. `DSV3Config.to_transformer_config()` is the single bridge to
megatron-core's `MLATransformerConfig`; `from_hf`/`to_hf` read and write Hugging Face
DeepSeek-V2/V3 `config.json` contents (fields we do not model are kept verbatim so a published
file round-trips).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

__all__ = [
    "YaRNConfig", "MLAConfig", "MoEConfig", "MTPConfig", "FP8Config", "ParallelConfig",
    "DSV3Config", "PRESETS", "piecewise", "FP8_ALWAYS_BF16", "FP8_MODULES",
]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        ok = v >= 0 if allow_zero else v > 0
        _check(ok, f"{type(obj).__name__}.{n} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _schedule(obj, name: str) -> None:
    """A schedule is ((start, value), ...) with strictly increasing starts, the first at 0."""
    s = getattr(obj, name)
    _check(len(s) >= 1 and s[0][0] == 0,
           f"{type(obj).__name__}.{name} must start at 0: ((0, v0), (t1, v1), ...), got {s}")
    starts = [t for t, _ in s]
    _check(all(a < b for a, b in zip(starts, starts[1:])),
           f"{type(obj).__name__}.{name} starts must increase strictly, got {starts}")


def piecewise(schedule: Tuple[Tuple[float, float], ...], t: float) -> float:
    """Value of a step schedule ((0, v0), (t1, v1), ...) at t (tokens or steps, as the owner says)."""
    value = schedule[0][1]
    for start, v in schedule:
        if t >= start:
            value = v
    return value


@dataclass(frozen=True)
class YaRNConfig:
    """YaRN context extension (Peng et al. 2023; DeepSeek-V3 section 4.3)."""
    factor: float = 40.0                          # s: target context / original context
    original_max_position_embeddings: int = 4096  # context the rope was trained at
    beta_fast: float = 32.0                       # rotations above which dims are not interpolated
    beta_slow: float = 1.0                        # rotations below which dims are fully interpolated
    mscale: float = 1.0                           # attention temperature coefficient (numerator)
    mscale_all_dim: float = 1.0                   # ... (denominator); softmax scale gets (m/m_all)^2

    def __post_init__(self):
        _check(self.factor >= 1.0, f"YaRNConfig.factor must be >= 1 (it scales the context), got {self.factor}")
        _positive(self, "original_max_position_embeddings")
        _check(self.beta_fast > self.beta_slow > 0,
               f"YaRNConfig needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}")
        _positive(self, "mscale", "mscale_all_dim", allow_zero=True)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1)."""
    q_lora_rank: Optional[int]        # d_c': query compression rank; None = direct projection (V2-Lite)
    kv_lora_rank: int                 # d_c: joint KV compression rank
    qk_nope_head_dim: int             # d_h: per-head dim of the un-rotated part of q and k
    qk_rope_head_dim: int             # d_h^R: decoupled rope dim (k^R is one head shared by all heads)
    v_head_dim: int                   # per-head value dim
    rope_theta: float = 10000.0
    rope_interleave: bool = True      # True: rope on (x0,x1),(x2,x3).. pairs as DeepSeek checkpoints; False: half-split
    yarn: Optional[YaRNConfig] = None
    recompute_up_proj: bool = False   # paper section 3.2.2: recompute norms + up-projections in backward
    attention_dropout: float = 0.0

    def __post_init__(self):
        _positive(self, "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "rope_theta")
        _check(self.qk_rope_head_dim % 2 == 0,
               f"MLAConfig.qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        _check(0.0 <= self.attention_dropout < 1.0, f"MLAConfig.attention_dropout must be in [0, 1), got {self.attention_dropout}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times YaRN's mscale^2 correction (as the published reference)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim and self.yarn.factor > 1:
            m = 0.1 * self.yarn.mscale_all_dim * math.log(self.yarn.factor) + 1.0
            scale = scale * m * m
        return scale


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE (V3 sections 2.1.2, 2.1.3) and its auxiliary-loss-free balancing."""
    num_experts: int                       # N_r routed experts
    num_shared_experts: int                # N_s shared experts (one fused MLP of N_s * expert_ffn_hidden_size)
    top_k: int                             # K_r activated routed experts per token
    expert_ffn_hidden_size: int            # per-expert SwiGLU width
    dense_ffn_hidden_size: int             # width of the dense MLP of the first k layers
    first_k_dense_replace: int = 0         # the first k layers are dense
    n_group: int = 1                       # expert groups (node-limited routing: one group per node)
    topk_group: int = 1                    # M: groups a token may use
    group_score_topk: int = 2              # a group's score = sum of its top-this biased affinities
    routed_scaling_factor: float = 1.0     # multiplies the normalised gate weights
    score_function: str = "sigmoid"        # "sigmoid" (V3) | "softmax" (V2)
    norm_topk_prob: bool = True            # normalise the chosen k gates to sum 1 (eq. 13)
    expert_bias: bool = True               # aux-loss-free bias b_i used only to choose experts (eq. 16)
    bias_update_rate: Tuple[Tuple[float, float], ...] = ((0, 1e-3),)  # gamma by tokens seen
    seq_aux_loss_coeff: float = 1e-4       # alpha of the sequence-wise balance loss (eq. 17-20); 0 = off
    aux_loss_type: str = "sequence"        # "sequence" (paper) | "batch" | "none"
    node_limited_by_placement: bool = False  # group = experts on one node of the EP group (exact "M nodes")

    def __post_init__(self):
        _positive(self, "num_experts", "top_k", "expert_ffn_hidden_size", "dense_ffn_hidden_size", "n_group",
                  "topk_group", "group_score_topk", "routed_scaling_factor")
        _positive(self, "num_shared_experts", "first_k_dense_replace", "seq_aux_loss_coeff", allow_zero=True)
        _check(self.score_function in ("sigmoid", "softmax"),
               f"MoEConfig.score_function must be 'sigmoid' or 'softmax', got {self.score_function!r}")
        _check(self.aux_loss_type in ("sequence", "batch", "none"),
               f"MoEConfig.aux_loss_type must be 'sequence', 'batch' or 'none', got {self.aux_loss_type!r}")
        _check(self.top_k <= self.num_experts,
               f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        _check(self.num_experts % self.n_group == 0,
               f"MoEConfig.num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        _check(self.topk_group <= self.n_group,
               f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        per_group = self.num_experts // self.n_group
        _check(self.top_k <= self.topk_group * per_group,
               f"MoEConfig.top_k ({self.top_k}) is not reachable within topk_group ({self.topk_group}) groups of "
               f"{per_group} experts (num_experts / n_group)")
        _check(self.group_score_topk <= per_group,
               f"MoEConfig.group_score_topk ({self.group_score_topk}) must be <= experts per group ({per_group})")
        _schedule(self, "bias_update_rate")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    def bias_rate_at(self, tokens: float) -> float:
        """gamma at this many training tokens (paper: 0.001, then 0 for the last 500B tokens)."""
        return piecewise(self.bias_update_rate, tokens)


@dataclass(frozen=True)
class MTPConfig:
    """Multi-Token Prediction (V3 section 2.2)."""
    num_layers: int = 0                                             # D: depth (0 = off)
    loss_weight: Tuple[Tuple[float, float], ...] = ((0, 0.3),)      # lambda by tokens seen (paper: 0.3 then 0.1)

    def __post_init__(self):
        _positive(self, "num_layers", allow_zero=True)
        _schedule(self, "loss_weight")
        _check(all(v >= 0 for _, v in self.loss_weight), f"MTPConfig.loss_weight values must be >= 0, got {self.loss_weight}")

    def loss_weight_at(self, tokens: float) -> float:
        return piecewise(self.loss_weight, tokens)


# FP8 training (section 3.3.1): what stays in BF16 whatever the config (no FP8 path: the paper's list), and the modules
# whose GEMMs run in FP8 unless named in FP8Config.bf16_modules (fp8/recipe.py says what each is)
FP8_ALWAYS_BF16 = ("embedding", "output_layer", "router", "norm", "core_attention")
FP8_MODULES = ("linear_q_down_proj", "linear_q_up_proj", "linear_q_proj", "linear_kv_down_proj", "linear_kv_up_proj",
               "linear_proj", "dense_mlp", "shared_experts", "experts", "eh_proj")


@dataclass(frozen=True)
class FP8Config:
    """FP8 training (V3 section 3.3): 1x128 activation tiles, 128x128 weight blocks, FP32 accumulation."""
    enabled: bool = False               # the linears and experts not in bf16_modules train in FP8 (--fp8)
    backend: str = "auto"               # "auto" (TE if it imports, else native) | "te" | "native" (--fp8-backend)
    act_tile: int = 128                 # N_c: activation scales per 1 x act_tile
    weight_block: int = 128             # weight scales per weight_block x weight_block
    format: str = "e4m3"                # the paper uses E4M3 everywhere
    bf16_modules: Tuple[str, ...] = FP8_ALWAYS_BF16   # kept in BF16: the paper's list, plus any of FP8_MODULES
    param_fp8: bool = False             # keep FP8 weight copies with their block scales
    dispatch_fp8: bool = True           # routed experts in FP8: tokens quantised (1x128, pow2) before the dispatch
                                        # all-to-all, half its bytes (section 3.3.4; fp8/dispatch.py); combine BF16
    weight_cache: Union[bool, str] = True   # FP8 weight copies made once per optimizer step and shared by the
                                        # micro-batches (fp8/weight_cache.py): True = Fprop's blocks and Dgrad's
                                        # transposed blocks, +2 bytes/FP8 param; "fprop" = Fprop's only, Dgrad's a
                                        # byte transpose of them per backward, +1 byte; False = none
    grouped_gemm: str = "triton"        # routed experts' GEMMs on CUDA: "triton" (Fprop/Dgrad/Wgrad one launch each,
                                        # offsets on the device: fp8/grouped_gemm.py; measured faster on the H200,
                                        # bench/results_fp8.md) | "host_loop" (one cuBLAS call per expert)

    def __post_init__(self):
        _check(self.backend in ("auto", "te", "native"), f"FP8Config.backend must be auto|te|native, got {self.backend!r}")
        _check(self.format in ("e4m3",), f"FP8Config.format must be 'e4m3', got {self.format!r}")
        _positive(self, "act_tile", "weight_block")
        _check(isinstance(self.dispatch_fp8, bool), f"FP8Config.dispatch_fp8 must be a bool, got {self.dispatch_fp8!r}")
        _check(isinstance(self.weight_cache, bool) or self.weight_cache == "fprop",
               f"FP8Config.weight_cache must be True, False or 'fprop', got {self.weight_cache!r}")
        _check(self.grouped_gemm in ("host_loop", "triton"),
               f"FP8Config.grouped_gemm must be host_loop|triton, got {self.grouped_gemm!r}")
        unknown = [m for m in self.bf16_modules if m not in FP8_ALWAYS_BF16 + FP8_MODULES]
        _check(not unknown, f"FP8Config.bf16_modules: unknown module(s) {unknown}; known: "
                            f"{', '.join(FP8_ALWAYS_BF16 + FP8_MODULES)}")
        missing = [m for m in FP8_ALWAYS_BF16 if m not in self.bf16_modules]
        _check(not missing, f"FP8Config.bf16_modules must keep {missing} (no FP8 path for them: the embedding, output "
                            f"head, router, norms and attention core stay in BF16, as the paper)")
        # the FP8 GEMMs (fp8/gemm.py) and TE's block scaling are built for the paper's N_c = 128
        _check(not self.enabled or (self.act_tile, self.weight_block) == (128, 128),
               f"FP8Config.enabled needs act_tile = weight_block = 128 (the FP8 GEMMs' tiles), got act_tile "
               f"{self.act_tile}, weight_block {self.weight_block}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"                 # "1f1b" | "interleaved" | "dualpipe" | "dualpipev" (pipeline/megatron_schedule.py)
    num_layers_in_first_pipeline_stage: Optional[int] = None  # uneven splits (the rest shared evenly)
    num_layers_in_last_pipeline_stage: Optional[int] = None

    def __post_init__(self):
        _positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                  "expert_tensor_parallel_size", "context_parallel_size", "virtual_pipeline_model_parallel_size")
        _positive(self, "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", allow_zero=True)
        _check(self.pipeline_schedule in ("1f1b", "interleaved", "dualpipe", "dualpipev"),
               f"ParallelConfig.pipeline_schedule must be 1f1b|interleaved|dualpipe|dualpipev, got {self.pipeline_schedule!r}")
        if self.pipeline_schedule in ("dualpipe", "dualpipev"):
            # two model chunks per rank placed by the schedule itself (megatron_dsv3/pipeline/megatron_schedule.py)
            pp, name = self.pipeline_model_parallel_size, self.pipeline_schedule
            what = f"pipeline_schedule {name!r} (--pipeline-schedule)"
            _check(pp >= 2, f"{what} needs pipeline_model_parallel_size (--pipeline-model-parallel-size) >= 2, "
                            f"got {pp}")
            _check(name == "dualpipev" or pp % 2 == 0,
                   f"{what} needs an even pipeline_model_parallel_size (--pipeline-model-parallel-size), got {pp}")
            _check(self.virtual_pipeline_model_parallel_size is None,
                   f"{what} places two chunks per rank itself: leave virtual_pipeline_model_parallel_size "
                   f"(--num-virtual-stages-per-pipeline-rank) unset")
        _check(self.pipeline_schedule != "interleaved" or self.virtual_pipeline_model_parallel_size,
               "pipeline_schedule 'interleaved' (--pipeline-schedule) needs virtual_pipeline_model_parallel_size "
               "(--num-virtual-stages-per-pipeline-rank)")
        # Features that parse but have no implementation yet are refused rather than silently replaced:
        # with ETP > 1 the expert-data-parallel group has size 1, so the TP-split expert gradients are never
        # summed and the TP ranks' experts drift apart; MLA has no context-parallel path.
        _check(self.expert_tensor_parallel_size == 1,
               f"ParallelConfig.expert_tensor_parallel_size > 1 is not available yet (got "
               f"{self.expert_tensor_parallel_size}): experts are split over expert_model_parallel_size only, use 1")
        _check(self.context_parallel_size == 1,
               f"ParallelConfig.context_parallel_size > 1 is not available yet (got {self.context_parallel_size}): "
               f"MLA has no context-parallel path, use 1")
        _check(not (self.sequence_parallel and self.tensor_model_parallel_size == 1),
               "ParallelConfig.sequence_parallel needs tensor_model_parallel_size > 1")


def _sub(cls, value):
    return cls(**value) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class DSV3Config:
    """The whole model: backbone sizes plus one config per feature."""
    num_layers: int                     # main-model transformer layers (MTP layers not counted)
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    mla: MLAConfig
    moe: MoEConfig
    mtp: MTPConfig = field(default_factory=MTPConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-6
    init_method_std: float = 0.006      # paper section 4.2
    recompute_norms: bool = False       # paper section 3.2.2: the layers' RMSNorm outputs are not kept, recomputed in
                                        # backward (megatron-core's selective "layernorm" recompute); MLA's latent
                                        # norms and up-projections: MLAConfig.recompute_up_proj: every learnable weight ~ N(0, 0.006)
    scaled_output_init: bool = False    # megatron's 1/sqrt(2*num_layers) std for output projections (not the paper's)
    params_dtype: str = "float32"       # "float32" | "bfloat16" | "float16" | "float64"
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 4096              # training sequence length
    name: str = "custom"
    hf_extra: Tuple[Tuple[str, Any], ...] = ()  # config.json fields we do not model, kept for to_hf()

    def __post_init__(self):
        for n, cls in (("mla", MLAConfig), ("moe", MoEConfig), ("mtp", MTPConfig), ("fp8", FP8Config),
                       ("parallel", ParallelConfig)):
            object.__setattr__(self, n, _sub(cls, getattr(self, n)))
        _positive(self, "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                  "norm_eps", "init_method_std", "make_vocab_size_divisible_by", "seq_length")
        _check(self.params_dtype in ("float32", "bfloat16", "float16", "float64"),
               f"DSV3Config.params_dtype must be float32|bfloat16|float16|float64, got {self.params_dtype!r}")
        moe, par = self.moe, self.parallel
        _check(moe.first_k_dense_replace <= self.num_layers,
               f"MoEConfig.first_k_dense_replace ({moe.first_k_dense_replace}) must be <= num_layers ({self.num_layers})")
        tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
        _check(self.num_attention_heads % tp == 0,
               f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
               f"ParallelConfig.tensor_model_parallel_size ({tp})")
        _check(moe.num_experts % ep == 0,
               f"MoEConfig.num_experts ({moe.num_experts}) must be divisible by "
               f"ParallelConfig.expert_model_parallel_size ({ep})")
        for n, pn in (("dense_ffn_hidden_size", "tensor_model_parallel_size"),
                      ("expert_ffn_hidden_size", "expert_tensor_parallel_size")):
            div = getattr(par, pn)
            _check(getattr(moe, n) % div == 0,
                   f"MoEConfig.{n} ({getattr(moe, n)}) must be divisible by ParallelConfig.{pn} ({div})")
        if moe.num_shared_experts:
            _check((moe.num_shared_experts * moe.expert_ffn_hidden_size) % tp == 0,
                   f"shared-expert width (num_shared_experts*expert_ffn_hidden_size = "
                   f"{moe.num_shared_experts * moe.expert_ffn_hidden_size}) must be divisible by tensor_model_parallel_size ({tp})")
        if moe.node_limited_by_placement:
            _check(moe.n_group % ep == 0 or ep % moe.n_group == 0,
                   f"MoEConfig.node_limited_by_placement needs n_group ({moe.n_group}) and expert_model_parallel_size "
                   f"({ep}) to divide one another")
        self.pipeline_layers()  # raises if the layers cannot be placed
        if par.sequence_parallel:
            _check(self.seq_length % tp == 0,
                   f"seq_length ({self.seq_length}) must be divisible by tensor_model_parallel_size ({tp}) with sequence_parallel")
        # FP8 has no shape rule: a dim off the 128 grid gets a partial last tile / block scaled by its own amax
        # (quant.py), and the CUDA GEMMs zero-pad it (gemm.py); multiples of 128 are only faster

    # ---- derived -------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """layer: 0-based global index; MTP layers (index >= num_layers) are MoE layers too."""
        return layer >= self.moe.first_k_dense_replace

    def pipeline_layers(self) -> Tuple[int, ...]:
        """Transformer layers per pipeline stage (first/last may be uneven), in the model's order. DualPipeV cuts
        the model into 2 x pipeline_model_parallel_size stages (rank r holds stages r and 2PP-1-r)."""
        par, n = self.parallel, self.num_layers
        pp = par.pipeline_model_parallel_size * (2 if par.pipeline_schedule == "dualpipev" else 1)
        first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
        if pp == 1:
            _check(first in (None, n) and last in (None, n),
                   "ParallelConfig.num_layers_in_first/last_pipeline_stage need pipeline_model_parallel_size > 1")
            return (n,)
        rest, middle = n, pp
        if first is not None:
            rest, middle = rest - first, middle - 1
        if last is not None:
            rest, middle = rest - last, middle - 1
        if middle == 0:
            _check(rest == 0, f"num_layers ({n}) != num_layers_in_first_pipeline_stage ({first}) + "
                              f"num_layers_in_last_pipeline_stage ({last}) with pipeline_model_parallel_size 2")
            return (first, last)
        _check(rest >= 0 and rest % middle == 0,
               f"num_layers ({n}) cannot be placed on {'2 x ' if pp != par.pipeline_model_parallel_size else ''}"
               f"pipeline_model_parallel_size ({par.pipeline_model_parallel_size}) stages"
               f"{' (pipeline_schedule dualpipev)' if pp != par.pipeline_model_parallel_size else ''} "
               f"(first={first}, last={last}): {rest} remaining layers over {middle} stages")
        per = rest // middle
        vpp = par.virtual_pipeline_model_parallel_size
        if vpp:
            _check(per % vpp == 0, f"layers per pipeline stage ({per}) must be divisible by "
                                   f"virtual_pipeline_model_parallel_size ({vpp})")
        out = [per] * pp
        if first is not None:
            out[0] = first
        if last is not None:
            out[-1] = last
        return tuple(out)

    @property
    def padded_vocab_size(self) -> int:
        div = self.make_vocab_size_divisible_by * self.parallel.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / div) * div)

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.params_dtype)

    # ---- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DSV3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        return cfg.replace(**overrides) if overrides else cfg

    def replace(self, **overrides) -> "DSV3Config":
        """Copy with fields replaced; feature configs take dicts of their own fields, e.g.
        cfg.replace(num_layers=4, moe={"top_k": 4}, parallel={"tensor_model_parallel_size": 2})."""
        kw = {}
        for k, v in overrides.items():
            cur = getattr(self, k)
            if dataclasses.is_dataclass(cur) and isinstance(v, Mapping):
                sub = {}
                for sk, sv in v.items():
                    sc = getattr(cur, sk)
                    sub[sk] = dataclasses.replace(sc, **sv) if dataclasses.is_dataclass(sc) and isinstance(sv, Mapping) else sv
                v = dataclasses.replace(cur, **sub)
            kw[k] = v
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DSV3Config":
        d = dict(d)
        if d.get("mla") and isinstance(d["mla"].get("yarn"), Mapping):
            d["mla"] = dict(d["mla"], yarn=YaRNConfig(**d["mla"]["yarn"]))
        for k in ("bias_update_rate",):
            if d.get("moe") and k in d["moe"]:
                d["moe"] = dict(d["moe"], **{k: tuple(tuple(x) for x in d["moe"][k])})
        if d.get("mtp") and "loss_weight" in d["mtp"]:
            d["mtp"] = dict(d["mtp"], loss_weight=tuple(tuple(x) for x in d["mtp"]["loss_weight"]))
        if d.get("fp8") and "bf16_modules" in d["fp8"]:
            d["fp8"] = dict(d["fp8"], bf16_modules=tuple(d["fp8"]["bf16_modules"]))
        d["hf_extra"] = tuple(tuple(x) for x in d.get("hf_extra", ()))
        return cls(**d)

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict, **overrides) -> "DSV3Config":
        """Read a DeepSeek-V2/V3 `config.json` (a directory holding it, the file, or the dict)."""
        from megatron_dsv3.hf_config import config_from_hf
        if isinstance(path_or_dict, (str, os.PathLike)):
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            with open(p) as f:
                path_or_dict = json.load(f)
        cfg = config_from_hf(cls, dict(path_or_dict))
        return cfg.replace(**overrides) if overrides else cfg

    def to_hf(self) -> dict:
        from megatron_dsv3.hf_config import config_to_hf
        return config_to_hf(self)

    # ---- bridges -------------------------------------------------------------------------------
    def to_transformer_config(self, **overrides):
        """The one place our configs become megatron-core's (MLA)TransformerConfig."""
        from megatron_dsv3.compat import make_transformer_config
        from megatron_dsv3.fp8.recipe import transformer_config_fp8
        # FP8 through TE: megatron-core enters TE's fp8_autocast per layer with the block-scaling recipe
        return make_transformer_config(self, **{**transformer_config_fp8(self.fp8), **overrides})

    def parameter_counts(self) -> dict:
        from megatron_dsv3.accounting import parameter_counts
        return parameter_counts(self)


# ---- presets -----------------------------------------------------------------------------------
_V3_YARN = YaRNConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0)


def _dsv3_671b() -> DSV3Config:
    # DeepSeek-V3 technical report, section 4.2 "Hyper-Parameters", and the published config.json.
    return DSV3Config(
        name="dsv3-671b", num_layers=61, hidden_size=7168, num_attention_heads=128, vocab_size=129280,
        max_position_embeddings=163840, seq_length=4096, norm_eps=1e-6, init_method_std=0.006,
        params_dtype="bfloat16",
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128, rope_theta=10000.0, rope_interleave=True, yarn=_V3_YARN,
                      recompute_up_proj=True),
        recompute_norms=True,   # section 3.2.2: RMSNorms and MLA up-projections recomputed in backward
        moe=MoEConfig(num_experts=256, num_shared_experts=1, top_k=8, expert_ffn_hidden_size=2048,
                      dense_ffn_hidden_size=18432, first_k_dense_replace=3, n_group=8, topk_group=4,
                      routed_scaling_factor=2.5, score_function="sigmoid", norm_topk_prob=True, expert_bias=True,
                      # gamma 0.001 for the first 14.3T tokens, 0 for the last 500B (section 4.2)
                      bias_update_rate=((0, 1e-3), (14.3e12, 0.0)), seq_aux_loss_coeff=1e-4),
        # lambda 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T (section 4.2)
        mtp=MTPConfig(num_layers=1, loss_weight=((0, 0.3), (10e12, 0.1))),
    )


def _dsv2_lite() -> DSV3Config:
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): MLA without query compression, softmax gating.
    return DSV3Config(
        name="dsv2-lite", num_layers=27, hidden_size=2048, num_attention_heads=16, vocab_size=102400,
        max_position_embeddings=163840, seq_length=4096, norm_eps=1e-6, init_method_std=0.006,
        params_dtype="bfloat16",
        mla=MLAConfig(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      yarn=YaRNConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                                      mscale=0.707, mscale_all_dim=0.707)),
        moe=MoEConfig(num_experts=64, num_shared_experts=2, top_k=6, expert_ffn_hidden_size=1408,
                      dense_ffn_hidden_size=10944, first_k_dense_replace=1, n_group=1, topk_group=1,
                      routed_scaling_factor=1.0, score_function="softmax", norm_topk_prob=False, expert_bias=False,
                      seq_aux_loss_coeff=1e-3),
        mtp=MTPConfig(num_layers=0),
    )


def _tiny() -> DSV3Config:
    # Every feature on, small enough to train on 2 CPU cores in minutes: 1 dense + 2 MoE layers,
    # 4 groups of 2 experts with 2 groups per token, a shared expert, MTP depth 1, YaRN.
    return DSV3Config(
        name="tiny", num_layers=3, hidden_size=128, num_attention_heads=4, vocab_size=384,
        max_position_embeddings=1024, seq_length=128, norm_eps=1e-6, init_method_std=0.02,
        params_dtype="float32", make_vocab_size_divisible_by=64,
        mla=MLAConfig(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      yarn=YaRNConfig(factor=4, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
                                      mscale=1.0, mscale_all_dim=1.0)),
        moe=MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_ffn_hidden_size=64,
                      dense_ffn_hidden_size=256, first_k_dense_replace=1, n_group=4, topk_group=2,
                      routed_scaling_factor=2.5, bias_update_rate=((0, 1e-3),), seq_aux_loss_coeff=1e-4),
        mtp=MTPConfig(num_layers=1, loss_weight=((0, 0.3),)),
    )


def _proxy_1gpu() -> DSV3Config:
    # DeepSeek-V3's shapes per head / per expert and its ratios (top-8 of fine-grained experts, 8 groups
    # with 4 per token, 1 shared, first layers dense), scaled to ~3B parameters for one 141 GB GPU.
    return DSV3Config(
        name="proxy-1gpu", num_layers=12, hidden_size=2048, num_attention_heads=16, vocab_size=129280,
        max_position_embeddings=163840, seq_length=4096, params_dtype="bfloat16",
        mla=MLAConfig(q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      yarn=_V3_YARN),
        moe=MoEConfig(num_experts=64, num_shared_experts=1, top_k=8, expert_ffn_hidden_size=512,
                      dense_ffn_hidden_size=5632, first_k_dense_replace=1, n_group=8, topk_group=4,
                      routed_scaling_factor=2.5, bias_update_rate=((0, 1e-3),), seq_aux_loss_coeff=1e-4),
        mtp=MTPConfig(num_layers=1, loss_weight=((0, 0.3),)),
    )


PRESETS = {"dsv3-671b": _dsv3_671b, "dsv2-lite": _dsv2_lite, "tiny": _tiny, "proxy-1gpu": _proxy_1gpu}
