"""The SwiGLU feed-forward network of the dense layers and the shared experts (DeepSeek-V3 section 2.1.2):

    FFN(u) = W2 (SiLU(W_gate u) * W_up u)

megatron-core's MLP (same parameters, TP layout, checkpoint keys) with its activation as moe/kernels.swiglu: one
Triton pass each way on CUDA that keeps only fc1's output [gate | up] for backward. megatron-core's unfused GLU
(bias_activation_fusion off, as our configs have it: its fused form needs torch.compile) also keeps SiLU(gate) and
up + glu_linear_offset (a new tensor even for an offset of 0): 2f elements a token more (73,728 bytes a token per
dense layer at V3 width, 8,192 per shared expert; tests/test_mlp.py), and runs the offset, SiLU, the product and
their backward as separate kernels. Anything megatron's MLP does that this does not (a bias,
per-token scales, TE's activation, clamped or offset GLUs, another activation) goes to megatron-core's forward.
"""
from __future__ import annotations

import inspect

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from megatron_dsv3.moe.kernels import swiglu

__all__ = ["SwiGLUMLP"]


class SwiGLUMLP(MLP):
    def __init__(self, config, submodules, is_expert: bool = False, input_size=None, ffn_hidden_size=None,
                 tp_group=None, pg_collection=None, is_mtp_layer: bool = False, **kwargs):
        """MLP's arguments, also as a TransformerLayer calls a spec'd mlp module that is not MLP itself
        (megatron-core >= 0.17: config, pg_collection, is_mtp_layer, name; it calls MLP through
        MLP.as_mlp_submodule, which takes the TP group from pg_collection the same way)."""
        if tp_group is None and pg_collection is not None:
            tp_group = pg_collection.tp
        accepted = inspect.signature(MLP.__init__).parameters
        extra = {k: v for k, v in kwargs.items() if k in accepted}      # `name` (>= 0.17); 0.16 takes none
        super().__init__(config=config, submodules=submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size, tp_group=tp_group, **extra)

    def _plain_swiglu(self, per_token_scale, kwargs) -> bool:
        c = self.config
        return (per_token_scale is None and not kwargs and c.gated_linear_unit and self.activation_func is F.silu
                and not c.add_bias_linear and not getattr(c, "use_te_activation_func", False)
                and getattr(c, "activation_func_clamp_value", None) is None
                and not getattr(c, "glu_linear_offset", 0.0))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._plain_swiglu(per_token_scale, kwargs):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        h1, _ = self.linear_fc1(hidden_states)                          # [s, b, 2f/tp] = [gate | up] of this rank
        a = swiglu(h1.reshape(-1, h1.shape[-1])).view(*h1.shape[:-1], -1)   # [s, b, f/tp]
        return self.linear_fc2(a)                                        # ([s, b, h], None)
