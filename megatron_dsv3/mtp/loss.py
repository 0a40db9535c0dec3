"""MTP loss weighting and reporting for the trainer (V3 section 2.2, eq. 25; lambda schedule in section 4.2).

The trainer owns the schedule: once per step it calls
    set_mtp_loss_weight(model_chunks, cfg.mtp.loss_weight_at(tokens_seen))
and reads per-depth losses, after the step's micro-batches, with
    mtp_loss_report(model_chunks, group=data_parallel_group)   # {depth k: mean L^k}
Both walk any nesting (lists of chunks, DDP / Float16 wrappers) and reach every MTPBlock; on pipeline stages
without MTP they do nothing and report {}.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Union

import torch

from megatron_dsv3.mtp.module import MTPBlock


def _blocks(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> List[MTPBlock]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MTPBlock)]


def set_mtp_loss_weight(model, weight: float) -> None:
    """lambda of eq. 25 for every MTP block of `model` (a module or a list of model chunks)."""
    if weight < 0:
        raise ValueError(f"MTP loss weight lambda must be >= 0, got {weight}")
    for b in _blocks(model):
        b.loss_weight = float(weight)


def set_mtp_enabled(model, enabled: bool) -> None:
    """Switch the MTP modules on/off (off: the model computes the main loss only; nothing else changes)."""
    for b in _blocks(model):
        b.enabled = bool(enabled)


def mtp_loss_report(model, reset: bool = True, group=None) -> Dict[int, float]:
    """{depth k: mean L^k} since the last reset, token-weighted over the micro-batches (and over `group`)."""
    out: Dict[int, float] = {}
    for b in _blocks(model):
        out.update(b.loss_report(reset=reset, group=group))
    return out


def set_mtp_backward_scale(scale: float) -> None:
    """The factor MTP gradients get in backward (megatron-core's MTPLossAutoScaler). megatron-core's pipeline
    schedules set it to 1/num_microbatches (times the grad scale) on every forward; a hand-written loop that
    averages the main loss over n micro-batches must call set_mtp_backward_scale(1/n) itself."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    MTPLossAutoScaler.set_loss_scale(torch.tensor(float(scale)))
