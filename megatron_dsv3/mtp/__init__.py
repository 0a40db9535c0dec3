"""Multi-Token Prediction (DeepSeek-V3 section 2.2): modules (module.py) and loss weighting (loss.py)."""
from megatron_dsv3.mtp.loss import mtp_loss_report, set_mtp_backward_scale, set_mtp_enabled, set_mtp_loss_weight
from megatron_dsv3.mtp.module import MTPBlock, MTPBlockSubmodules, MTPModule, MTPModuleSubmodules, roll_left

__all__ = ["MTPBlock", "MTPBlockSubmodules", "MTPModule", "MTPModuleSubmodules", "roll_left",
           "set_mtp_loss_weight", "set_mtp_enabled", "mtp_loss_report", "set_mtp_backward_scale"]
