"""The one routine that runs after each optimizer step, for our trainer and for Megatron-LM's (megatron_lm.py).

Per global batch, after `optimizer.step()` returned `update_successful`:
  * aux-loss-free balancing (paper eq. 16 and section 2.1.2): every router's token counts of this batch are
    all-reduced once and its bias moves by +-gamma, gamma = MoEConfig.bias_rate_at(tokens seen before the batch);
    when the optimizer skipped its step (inf/NaN gradients) the batch did not happen for the model, so the counts
    are discarded and the bias stays (the same collective runs with gamma 0: every rank takes the same path);
  * the MTP lambda of the next batch (MTPConfig.loss_weight_at(tokens seen after it), paper section 4.2);
  * the EMA of the parameters (training/ema.py, paper section 3.2.3), when the trainer keeps one and the step
    happened: a snapshot is taken and averaged in on the host in the background.
"""
from __future__ import annotations

from typing import Dict


def after_optimizer_step(model_chunks, cfg, tokens_before: float, tokens_after: float,
                         update_successful: bool = True, ema=None) -> Dict[str, dict]:
    """Collective over each pipeline stage's balance group. Returns the routers' metrics
    (megatron_dsv3.moe.router.apply_expert_bias_update) with "bias_rate" (the gamma applied)."""
    from megatron_dsv3.moe.router import apply_expert_bias_update
    from megatron_dsv3.mtp.loss import set_mtp_loss_weight

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    rate = cfg.moe.bias_rate_at(tokens_before) if update_successful else 0.0
    routers = apply_expert_bias_update(chunks, rate)
    for m in routers.values():
        m["bias_rate"] = rate
    set_mtp_loss_weight(chunks, cfg.mtp.loss_weight_at(tokens_after))
    if cfg.fp8.enabled:               # the weights changed behind autograd's version counter: FP8 copies are stale
        from megatron_dsv3.fp8.weight_cache import drop_caches
        drop_caches(chunks)
    if ema is not None and update_successful:
        ema.update()
    return routers
