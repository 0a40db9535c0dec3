"""Training schedules as pure functions of the step or of the samples seen (DeepSeek-V3 section 4.2).

Learning rate, in steps: linear warmup 0 -> max_lr over `warmup` steps; hold max_lr for `hold` steps;
decay to min_lr over `decay` steps ("cosine" | "linear" | "constant"); then min_lr, or the
`tail` stages ((start_step, lr), ...) that the paper uses for its last 500B tokens (2.2e-5 then
7.3e-6). The paper's run: warmup 2K steps to 2.2e-4, hold until 10T tokens, cosine to 2.2e-5 over
4.3T tokens, 2.2e-5 for 333B tokens, 7.3e-6 for the last 167B.

Batch size, in samples: ramp from `start` to the full global batch in steps of `increment`,
spread evenly over `ramp_samples` (the paper: 3072 -> 15360 sequences over the first 469B tokens),
as Megatron-LM's `--rampup-batch-size start increment ramp_samples`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float = 0.0
    warmup: int = 0                      # steps of linear warmup from 0
    hold: int = 0                        # steps at max_lr after warmup
    decay: Optional[int] = None          # steps of decay after the hold (None: to the last step)
    style: str = "cosine"                # "cosine" | "linear" | "constant"
    tail: Tuple[Tuple[int, float], ...] = ()   # ((start_step, lr), ...) after the decay

    def __post_init__(self):
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"LRSchedule.style must be cosine|linear|constant, got {self.style!r}")
        if self.max_lr < self.min_lr or self.min_lr < 0:
            raise ValueError(f"LRSchedule needs max_lr >= min_lr >= 0, got {self.max_lr}, {self.min_lr}")
        if any(b[0] <= a[0] for a, b in zip(self.tail, self.tail[1:])):
            raise ValueError(f"LRSchedule.tail starts must increase strictly, got {self.tail}")

    def lr_at(self, step: int, total_steps: Optional[int] = None) -> float:
        """LR of the optimizer step that follows `step` completed steps."""
        if self.warmup and step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        t = step - self.warmup - self.hold
        if t < 0 or self.style == "constant":
            return self.max_lr
        decay = self.decay if self.decay is not None else max(1, (total_steps or step + 1) - self.warmup - self.hold)
        if t < decay:
            frac = t / decay
            if self.style == "linear":
                return self.max_lr - (self.max_lr - self.min_lr) * frac
            return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * frac))
        lr = self.min_lr
        for start, v in self.tail:
            if step >= start:
                lr = v
        return lr


@dataclass(frozen=True)
class BatchRamp:
    global_batch_size: int
    start: Optional[int] = None          # None: no ramp-up
    increment: int = 1
    ramp_samples: int = 0

    def __post_init__(self):
        if self.start is not None:
            if not (0 < self.start <= self.global_batch_size) or self.increment <= 0:
                raise ValueError(f"BatchRamp needs 0 < start <= global_batch_size and increment > 0, got "
                                 f"start={self.start}, increment={self.increment}, gbs={self.global_batch_size}")
            if (self.global_batch_size - self.start) % self.increment:
                raise ValueError(f"BatchRamp: global_batch_size - start ({self.global_batch_size - self.start}) "
                                 f"must be a multiple of increment ({self.increment})")

    def batch_size_at(self, consumed_samples: int) -> int:
        if self.start is None or self.start == self.global_batch_size:
            return self.global_batch_size
        n_incr = (self.global_batch_size - self.start) // self.increment
        per_incr = self.ramp_samples / n_incr
        steps = int(consumed_samples / per_incr) if per_incr > 0 else n_incr
        return min(self.start + steps * self.increment, self.global_batch_size)

    def samples_for(self, iters: int, consumed: int = 0) -> int:
        """Samples consumed by `iters` more steps starting at `consumed`."""
        for _ in range(iters):
            consumed += self.batch_size_at(consumed)
        return consumed


def num_microbatches(global_batch: int, micro_batch: int, data_parallel: int) -> int:
    if global_batch % (micro_batch * data_parallel):
        raise ValueError(f"global batch size ({global_batch}) must be divisible by micro-batch size ({micro_batch}) "
                         f"x data-parallel size ({data_parallel})")
    return global_batch // (micro_batch * data_parallel)


def steps_for_tokens(ramp: BatchRamp, tokens: float, seq_length: int) -> int:
    """Optimizer steps until `tokens` tokens are consumed under this batch schedule (to turn the paper's
    token-denominated milestones into the step counts of --lr-hold-iters / --lr-decay-iters / --lr-tail)."""
    samples, steps, goal = 0, 0, tokens / seq_length
    while samples < goal:
        samples += ramp.batch_size_at(samples)
        steps += 1
    return steps


def paper_schedule(seq_length: int = 4096) -> dict:
    """DeepSeek-V3's pre-training schedule (section 4.2) in steps: batch 3072 -> 15360 over 469B tokens, LR
    warmup 2K steps to 2.2e-4, constant to 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B tokens,
    7.3e-6 for the last 167B (14.8T in all)."""
    ramp = BatchRamp(15360, start=3072, increment=768, ramp_samples=int(469e9 / seq_length))
    at = lambda t: steps_for_tokens(ramp, t, seq_length)
    hold_end, decay_end, tail2 = at(10e12), at(14.3e12), at(14.633e12)
    total = at(14.8e12)
    return {"train_iters": total, "warmup": 2000, "hold": hold_end - 2000, "decay": decay_end - hold_end,
            "tail": ((decay_end, 2.2e-5), (tail2, 7.3e-6)), "rampup": (3072, 768, int(469e9 / seq_length)),
            "global_batch_size": 15360}
