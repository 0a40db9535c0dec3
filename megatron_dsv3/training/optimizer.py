"""Adam's moments in BF16 (paper section 3.3.3), FP32 master weights and FP32 gradients: megatron-core's optimizer
with the moments stored in the dtype `--adam-moments-dtype` names.

Two ways, picked by what megatron-core's `get_megatron_optimizer` builds its Adam from:
* Transformer Engine's FusedAdam (TE imports): megatron-core's precision-aware optimizer
  (OptimizerConfig.use_precision_aware_optimizer, exp_avg_dtype, exp_avg_sq_dtype). It needs the distributed
  optimizer; master weights and gradients stay FP32 (main_params_dtype, main_grads_dtype).
* torch's AdamW (neither TE nor apex: megatron-core 0.16-0.19 then call `torch.optim.AdamW`): `BF16MomentAdamW`
  below, put in its place for the call (compat.torch_adamw_class). Its state is torch's (exp_avg, exp_avg_sq, step),
  so megatron's distributed optimizer saves, reshards and loads it as it does torch's.

The update, per parameter, as TE's FusedAdam does it: read the stored moments, update them in FP32, step the FP32
master weight with the FP32 moments, store the moments rounded to nearest BF16. BF16 keeps 8 significant bits: the
second moment's decay (1 - beta2 per step) must exceed half a BF16 ulp (2^-9 = 0.2%) or a moment that should decay
stays put: the paper's beta2 = 0.95 decays 5% a step; beta2 = 0.999 would not decay in BF16.

The gradients reach the optimizer in FP32 already (megatron DDP's grad_reduce_in_fp32 buffer, loop.py).
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class BF16MomentAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay, bias correction, eps outside the square root) whose exp_avg and
    exp_avg_sq are stored in `moments_dtype`; the arithmetic is FP32 whatever the parameter's dtype (megatron gives it
    the FP32 master weights). A subclass so that megatron-core's isinstance checks for torch's AdamW hold."""

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, moments_dtype: torch.dtype = torch.bfloat16, **_ignored):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        # an attribute, not a param_group entry: a checkpoint's param_groups replace ours on load, the dtype is
        # this run's choice (--adam-moments-dtype)
        self.moments_dtype = moments_dtype

    def _new_state(self, p: torch.Tensor) -> dict:
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st.update(self._new_state(p))
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().mul_(beta1).add_(g, alpha=1 - beta1)           # m_t = b1 m + (1-b1) g
                v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v_t = b2 v + (1-b2) g^2
                w = p.float()
                w.mul_(1 - lr * wd)                                                     # decoupled weight decay
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))                     # w -= lr m^ / (sqrt(v^) + eps)
                if w is not p:
                    p.copy_(w)
                st["exp_avg"].copy_(m)                                                  # rounded to nearest
                st["exp_avg_sq"].copy_(v)
        return loss

    def load_state_dict(self, state_dict) -> None:
        """torch casts every floating state tensor but `step` to the parameter's dtype (FP32) on load: cast the
        moments back to this run's dtype (exact for BF16 values; FP32 -> BF16 rounds, a checkpoint of FP32 moments
        resumed with BF16 ones)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st and st[k].dtype != self.moments_dtype:
                    st[k] = st[k].to(self.moments_dtype)


def adam_backend() -> str:
    """What megatron-core's get_megatron_optimizer builds Adam from here: "te" (Transformer Engine's FusedAdam with
    the precision-aware arguments), "apex" (apex's FusedAdam, or a TE too old for them) or "torch"."""
    import megatron.core.optimizer as mo
    if getattr(mo, "USING_PYTORCH_OPTIMIZER", False):
        return "torch"
    try:
        import inspect
        from transformer_engine.pytorch.optimizers import FusedAdam
    except ImportError:
        return "apex"
    names = inspect.signature(FusedAdam).parameters
    return "te" if all(n in names for n in ("exp_avg_dtype", "exp_avg_sq_dtype", "master_weight_dtype")) else "apex"


def moments_plan(moments: str, use_distributed_optimizer: bool,
                 backend: Optional[str] = None) -> Tuple[dict, Optional[Type[torch.optim.Optimizer]]]:
    """(OptimizerConfig fields, torch Adam class to build instead of torch.optim.AdamW or None) for
    --adam-moments-dtype `moments`. ValueError (one line, naming the flags) where this install cannot do it."""
    if moments not in MOMENT_DTYPES:
        raise ValueError(f"--adam-moments-dtype {moments!r}: one of {', '.join(MOMENT_DTYPES)}")
    if moments == "fp32":
        return {}, None
    backend = backend or adam_backend()
    dtype = MOMENT_DTYPES[moments]
    if backend == "te":
        if not use_distributed_optimizer:
            raise ValueError(f"--adam-moments-dtype {moments} with --no-distributed-optimizer: with Transformer Engine "
                             f"the moments are megatron-core's precision-aware optimizer, which needs the distributed "
                             f"optimizer; leave out --no-distributed-optimizer")
        return dict(use_precision_aware_optimizer=True, exp_avg_dtype=dtype, exp_avg_sq_dtype=dtype,
                    main_params_dtype=torch.float32, main_grads_dtype=torch.float32), None
    if backend == "torch":
        return {}, _with_dtype(dtype)
    raise ValueError(f"--adam-moments-dtype {moments}: megatron-core builds apex's FusedAdam here (no Transformer "
                     f"Engine FusedAdam with exp_avg_dtype), which keeps FP32 moments; install Transformer Engine or "
                     f"use --adam-moments-dtype fp32")


def _with_dtype(dtype: torch.dtype) -> Type[BF16MomentAdamW]:
    class AdamW(BF16MomentAdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, moments_dtype=dtype, **k)
    AdamW.__qualname__ = AdamW.__name__ = f"AdamW_{str(dtype).replace('torch.', '')}_moments"
    return AdamW


def build_optimizer(config_kwargs: dict, chunks, moments: str = "fp32"):
    """megatron-core's get_megatron_optimizer(OptimizerConfig(**config_kwargs, + the moments' fields), chunks)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_dsv3.compat import torch_adamw_class
    fields, adam_cls = moments_plan(moments, config_kwargs.get("use_distributed_optimizer", False))
    oc = OptimizerConfig(**config_kwargs, **fields)
    with torch_adamw_class(adam_cls):
        return get_megatron_optimizer(oc, chunks)


def moments_dtype_of(optimizer) -> Optional[torch.dtype]:
    """The dtype of the first exp_avg in a megatron optimizer's state (None before the first step)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for st in inner.state.values():
            if "exp_avg" in st:
                return st["exp_avg"].dtype
    return None
