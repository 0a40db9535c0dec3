"""Multi-head Latent Attention (DeepSeek-V2/V3) with YaRN rope, as a megatron-core module."""
from megatron_dsv3.mla.attention import MLASelfAttention, MLASubmodules
from megatron_dsv3.mla.inference import LatentKVCache, absorbed_attention
from megatron_dsv3.mla.rope import RotaryEmbedding, apply_rope, inverse_frequencies, rope_attention_factor

__all__ = ["MLASelfAttention", "MLASubmodules", "LatentKVCache", "absorbed_attention", "RotaryEmbedding",
           "apply_rope", "inverse_frequencies", "rope_attention_factor"]
