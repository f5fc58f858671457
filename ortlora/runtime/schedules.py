"""Learning-rate schedules: lr at optimizer step ``step`` (0-based) of ``total``.

Every schedule may start with a linear warmup: lr * (step + 1) / warmup for step < warmup, so the
first step already learns and step warmup - 1 reaches the peak (transformers' warmup starts at 0:
lr * step / warmup). After warmup, with progress = (step - warmup) / (total - warmup):

- constant:      lr
- linear:        lr + (min_lr - lr) * progress
- cosine:        min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2
- warmup-cosine: cosine, with a warmup of 10% of the steps when none is given

The decay reaches min_lr at step ``total``, one past the last, as transformers' schedules do, so every
scheduled step learns (``--max-steps 1`` trains at lr). After warmup these are transformers'
``get_linear_schedule_with_warmup`` and ``get_cosine_schedule_with_warmup`` (min_lr 0), and
``get_cosine_with_min_lr_schedule_with_warmup`` (min_lr_rate = min_lr / lr) for the cosine with a floor;
tests/test_optim.py checks each. Past the end, lr stays at min_lr (transformers' cosine rises again).
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
        decay_steps = self.total - self.warmup
        progress = 1.0 if decay_steps <= 0 else min(1.0, (step - self.warmup) / decay_steps)
        if self.name == "linear":
            return self.lr + (self.min_lr - self.lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
