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
    """MLA self-attention spec (issue: MLA)."""
    raise NotImplementedError


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
