"""Learning rate: linear warm-up, then cosine decay to ``lr * min_lr_ratio``.

lr(t) = lr * (t + 1) / W                                   for t < W
lr(t) = lr * (m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2)   otherwise
"""

from __future__ import annotations

import math


class WarmupCosine:
    def __init__(self, optimizer, base_lr: float, warmup: int, total: int, min_ratio: float):
        self.optimizer, self.base_lr = optimizer, base_lr
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio
        self.step_num = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup:
            return self.base_lr * (t + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (t - self.warmup) / span)
        m = self.min_ratio
        return self.base_lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_num)

    def _apply(self) -> None:
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_num": self.step_num}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])
        self._apply()
