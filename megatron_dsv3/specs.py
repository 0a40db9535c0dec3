"""The ONLY place that chooses classes: ModuleSpecs for backends "local" and "te".

"local": megatron-core's tensor-parallel linears and our plain-torch norms/attention (runs on CPU).
"te":    megatron-core's Transformer Engine wrappers (megatron.core.extensions.transformer_engine),
         selected only when TE imports. Modules never ask which class they were given.
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
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear, TEDotProductAttention, TELinear, TENorm, TERowParallelLinear)
        duplicated = ModuleSpec(module=TELinear, params={"parallel_mode": "duplicated"})
        norm, column, row, core = TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from megatron_dsv3.mla.core_attention import SDPAttention
        from megatron_dsv3.mla.linear import DuplicatedLinear
        from megatron_dsv3.norm import RMSNorm
        duplicated, norm, column, row, core = DuplicatedLinear, RMSNorm, ColumnParallelLinear, RowParallelLinear, SDPAttention
    return ModuleSpec(
        module=MLASelfAttention,
        params={"mla": config.mla, "attn_mask_type": AttnMaskType.causal},
        submodules=MLASubmodules(
            linear_q_down_proj=duplicated, q_layernorm=norm, linear_q_up_proj=column, linear_q_proj=column,
            linear_kv_down_proj=duplicated, kv_layernorm=norm, linear_kv_up_proj=column,
            core_attention=core, linear_proj=row,
        ),
    )


def get_dense_mlp_spec(config, backend: str = "local"):
    """SwiGLU MLP of the first k dense layers (issue: MoE)."""
    raise NotImplementedError


def get_moe_spec(config, backend: str = "local"):
    """DeepSeekMoE spec: router + routed experts + shared experts (issue: MoE)."""
    raise NotImplementedError


def get_layer_spec(config, moe_layer: bool, backend: str = "local"):
    """One transformer layer: RMSNorm -> MLA -> residual -> RMSNorm -> MLP|MoE -> residual (issue: model)."""
    raise NotImplementedError


def get_decoder_block_spec(config, backend: str = "local"):
    """Per-layer specs for megatron-core's TransformerBlock (issue: model)."""
    raise NotImplementedError


def get_mtp_block_spec(config, backend: str = "local"):
    """The D MTP modules (issue: model)."""
    raise NotImplementedError
