"""DeepSeekMoE: sigmoid group-limited router with auxiliary-loss-free balancing, grouped experts, EP dispatch."""
from megatron_dsv3.moe.experts import GroupedExperts
from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
from megatron_dsv3.moe.router import (Router, apply_expert_bias_update, set_aux_loss_scale, update_expert_bias)

__all__ = ["DeepSeekMoE", "DeepSeekMoESubmodules", "GroupedExperts", "Router", "apply_expert_bias_update",
           "set_aux_loss_scale", "update_expert_bias"]
