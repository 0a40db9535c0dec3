"""The ONLY place that chooses classes: ModuleSpecs for backends "local" and "te".

"local": megatron-core's tensor-parallel linears and our plain-torch norms/attention (runs on CPU).
"te":    megatron-core's Transformer Engine wrappers (megatron.core.extensions.transformer_engine),
         selected only when TE imports. Modules never ask which class they were given.

FP8 (DSV3Config.fp8.enabled; fp8/recipe.py resolves its backend): each linear named in FP8_MODULES and not kept in
FP8Config.bf16_modules becomes an FP8 linear -- ours (fp8/linear.py) with the native backend, TE's with the te
backend (TE runs them in FP8 under megatron-core's fp8_autocast); a linear kept in BF16 under the te backend is
megatron-core's local class, which the autocast does not touch. The routed experts are FP8GroupedExperts in both,
reached by the FP8 dispatch (FP8DispatchMoE, fp8/dispatch.py) unless FP8Config.dispatch_fp8 is off.
"""
from __future__ import annotations

from megatron_dsv3.compat import HAVE_TE

BACKENDS = ("local", "te")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "te" and not HAVE_TE:
        raise ValueError("backend 'te' needs Transformer Engine, which does not import here "
                         "(pip install 'megatron_dsv3[te]' on a CUDA machine); use backend='local'")
    return backend


def _fp8_backend(config):
    from megatron_dsv3.fp8.recipe import resolve_backend
    return resolve_backend(getattr(config, "fp8", None))


def _linear(config, backend: str, kind: str, name: str):
    """The class (or spec) of one linear: kind "column" | "row" | "duplicated"; `name` as FP8Config.bf16_modules
    spells it. BF16: the backend's class. FP8: see the module docstring."""
    fp8 = _fp8_backend(config)
    in_fp8 = fp8 is not None and name not in config.fp8.bf16_modules
    if (backend == "te" and fp8 != "te" and not in_fp8) or (fp8 == "te" and in_fp8):
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear, TELinear,
                                                                 TERowParallelLinear)
        from megatron.core.transformer.spec_utils import ModuleSpec
        return {"column": TEColumnParallelLinear, "row": TERowParallelLinear,
                "duplicated": ModuleSpec(module=TELinear, params={"parallel_mode": "duplicated"})}[kind]
    if in_fp8:                       # native FP8
        from megatron_dsv3.fp8.linear import FP8ColumnParallelLinear, FP8DuplicatedLinear, FP8RowParallelLinear
        return {"column": FP8ColumnParallelLinear, "row": FP8RowParallelLinear, "duplicated": FP8DuplicatedLinear}[kind]
    # megatron-core's Column/RowParallelLinear with the weight gradient accumulated by the GEMM (fused_wgrad.py)
    from megatron_dsv3.fused_wgrad import FusedWgradColumnParallelLinear, FusedWgradRowParallelLinear
    from megatron_dsv3.mla.linear import DuplicatedLinear
    return {"column": FusedWgradColumnParallelLinear, "row": FusedWgradRowParallelLinear,
            "duplicated": DuplicatedLinear}[kind]


def get_mla_spec(config, backend: str = "local"):
    """MLA self-attention spec (issue: MLA). `config` is a DSV3Config (or anything with `.mla`).

    local: DuplicatedLinear down-projections, our RMSNorm, megatron-core Column/RowParallelLinear,
           SDPAttention (torch SDPA; cuDNN first on CUDA).
    te:    TELinear(parallel_mode="duplicated"), TENorm, TEColumnParallelLinear, TERowParallelLinear,
           TEDotProductAttention. Norms stay separate modules (not TELayerNormColumnParallelLinear) so the
           parameter names are the same in both backends and conversion needs one table.
    """
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dsv3.mla.attention import MLASelfAttention, MLASubmodules

    check_backend(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
        norm, core = TENorm, TEDotProductAttention
    else:
        from megatron_dsv3.mla.core_attention import SDPAttention
        from megatron_dsv3.norm import RMSNorm
        norm, core = RMSNorm, SDPAttention
    lin = lambda kind, name: _linear(config, backend, kind, name)   # noqa: E731
    return ModuleSpec(
        module=MLASelfAttention,
        params={"mla": config.mla, "attn_mask_type": AttnMaskType.causal},
        submodules=MLASubmodules(
            linear_q_down_proj=lin("duplicated", "linear_q_down_proj"), q_layernorm=norm,
            linear_q_up_proj=lin("column", "linear_q_up_proj"), linear_q_proj=lin("column", "linear_q_proj"),
            linear_kv_down_proj=lin("duplicated", "linear_kv_down_proj"), kv_layernorm=norm,
            linear_kv_up_proj=lin("column", "linear_kv_up_proj"),
            core_attention=core, linear_proj=lin("row", "linear_proj"),
        ),
    )


def _mlp_linears(config, backend: str, name: str):
    """(linear_fc1, linear_fc2) classes of an MLP; name "dense_mlp" | "shared_experts" (FP8Config.bf16_modules)."""
    return _linear(config, backend, "column", name), _linear(config, backend, "row", name)


def get_dense_mlp_spec(config, backend: str = "local"):
    """SwiGLU MLP of the first k dense layers (issue: MoE): megatron-core's MLP with our SwiGLU (mlp.SwiGLUMLP) of
    width MoEConfig.dense_ffn_hidden_size (= the TransformerConfig's ffn_hidden_size from to_transformer_config).
    Parameters: linear_fc1.weight [2*ffn/tp, h] ([gate; up] per TP rank), linear_fc2.weight [h, ffn/tp]."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dsv3.mlp import SwiGLUMLP

    column, row = _mlp_linears(config, check_backend(backend), "dense_mlp")
    return ModuleSpec(module=SwiGLUMLP, params={"ffn_hidden_size": config.moe.dense_ffn_hidden_size},
                      submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))


def get_moe_spec(config, backend: str = "local", pg_collection=None):
    """DeepSeekMoE spec: router + routed experts + shared experts (issue: MoE). `config` is a DSV3Config.

    Router and GroupedExperts are ours in both backends; the shared experts are megatron-core's MLP with our
    SwiGLU (mlp.SwiGLUMLP; TE linears with backend "te") of width num_shared_experts * expert_ffn_hidden_size.
    pg_collection: the model's process groups (megatron-core's TransformerLayer does not hand them to an MLP class it does not
    know, so the spec carries them: the balance group of the bias update, EP dispatch, expert replicas).
    """
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dsv3.mlp import SwiGLUMLP
    from megatron_dsv3.moe.experts import GroupedExperts
    from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
    from megatron_dsv3.moe.router import Router

    column, row = _mlp_linears(config, check_backend(backend), "shared_experts")
    shared = None
    if config.moe.num_shared_experts > 0:
        shared = ModuleSpec(module=SwiGLUMLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))
    experts, module = GroupedExperts, DeepSeekMoE
    if _fp8_backend(config) is not None and "experts" not in config.fp8.bf16_modules:
        from megatron_dsv3.fp8.experts import FP8GroupedExperts as experts
        if config.fp8.dispatch_fp8:        # the tokens go to the FP8 experts in FP8 (fp8/dispatch.py)
            from megatron_dsv3.fp8.dispatch import FP8DispatchMoE as module
    params = {"moe": config.moe}
    if pg_collection is not None:      # megatron-core 0.19's TransformerLayer passes its own as pg_collection
        params["model_pg_collection"] = pg_collection
    return ModuleSpec(module=module, params=params,
                      submodules=DeepSeekMoESubmodules(router=Router, experts=experts, shared_experts=shared))


def get_layer_spec(config, moe_layer: bool, backend: str = "local", pg_collection=None):
    """One transformer layer: RMSNorm -> MLA -> residual -> RMSNorm -> MLP|MoE -> residual (issue: model).

    megatron-core's TransformerLayer with our RMSNorm (both backends: same parameter names, and it allows
    sequence parallelism), MLA, and the dense MLP (first k layers) or DeepSeekMoE.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_dsv3.norm import RMSNorm

    check_backend(backend)
    mlp = get_moe_spec(config, backend, pg_collection) if moe_layer else get_dense_mlp_spec(config, backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm, self_attention=get_mla_spec(config, backend), self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add,
        ),
    )


def get_decoder_block_spec(config, backend: str = "local", vp_stage=None, pp_rank=None, all_layers: bool = False,
                           pg_collection=None):
    """Per-layer specs for megatron-core's TransformerBlock (issue: model): the first
    MoEConfig.first_k_dense_replace layers dense, the rest DeepSeekMoE, then the final RMSNorm.

    megatron-core (0.16-0.19) builds every spec it is given: the pipeline stage's slice is chosen here, as
    megatron-core's get_gpt_decoder_block_spec does, from (pp_rank, vp_stage) and the uneven first/last stage
    sizes of ParallelConfig (pp_rank defaults to parallel_state's). all_layers=True returns all num_layers specs.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_dsv3.norm import RMSNorm

    check_backend(backend)
    dense, moe = get_layer_spec(config, False, backend), get_layer_spec(config, True, backend, pg_collection)
    specs = [moe if config.is_moe_layer(i) else dense for i in range(config.num_layers)]
    if not all_layers and config.parallel.pipeline_model_parallel_size > 1:
        tc = config.to_transformer_config()
        if pp_rank is None:
            from megatron.core import parallel_state
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        offset = get_transformer_layer_offset(tc, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = specs[offset:offset + get_num_layers_to_build(tc, vp_stage=vp_stage, pp_rank=pp_rank)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def get_mtp_block_spec(config, backend: str = "local", pg_collection=None):
    """The D MTP modules (issue: model; V3 section 2.2): per depth, RMSNorms on the embedding and the hidden
    state, the projection M_k (column-parallel, gathered), one MLA + DeepSeekMoE layer, a final RMSNorm.
    None when MTPConfig.num_layers is 0."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dsv3.mtp.module import MTPBlock, MTPBlockSubmodules, MTPModule, MTPModuleSubmodules
    from megatron_dsv3.norm import RMSNorm

    check_backend(backend)
    if config.mtp.num_layers == 0:
        return None
    column = _linear(config, backend, "column", "eh_proj")
    module = ModuleSpec(module=MTPModule, submodules=MTPModuleSubmodules(
        enorm=RMSNorm, hnorm=RMSNorm, eh_proj=column, transformer_layer=get_layer_spec(config, True, backend, pg_collection),
        final_layernorm=RMSNorm))
    return ModuleSpec(module=MTPBlock, params={"mtp": config.mtp},
                      submodules=MTPBlockSubmodules(layer_specs=[module] * config.mtp.num_layers))
