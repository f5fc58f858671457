"""Learning-rate schedules: lr at optimizer step ``step`` (0-based) of ``total``.

Every schedule may start with a linear warmup: lr * (step + 1) / warmup for step < warmup, so the
first step already learns and step warmup - 1 reaches the peak. After warmup:

- constant:      lr
- linear:        lr down to min_lr at the last step (step total - 1)
- cosine:        min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2
- warmup-cosine: cosine, with a warmup of 10% of the steps when none is given

Past the end, lr stays at its final value (min_lr for the decaying schedules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine", "warmup-cosine")


@dataclass(frozen=True)
class Schedule:
    name: str
    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose from {', '.join(SCHEDULES)}")
        if self.name == "warmup-cosine" and self.warmup == 0:
            object.__setattr__(self, "warmup", max(1, self.total // 10))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.name == "constant":
            return self.lr
        decay_steps = self.total - 1 - self.warmup
        progress = 1.0 if decay_steps <= 0 else min(1.0, (step - self.warmup) / decay_steps)
        if self.name == "linear":
            return self.lr + (self.min_lr - self.lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
