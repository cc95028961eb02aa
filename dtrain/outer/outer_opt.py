"""The outer optimizer of DiLoCo: Nesterov SGD on the global parameters.

With the mean pseudo-gradient g = mean_k (theta_global - theta_local_k) of a
round (it points from the new local parameters back to the old global ones,
like a gradient), for the parameters it covers:

    v     <- mu * v + g
    theta <- theta - lr_t * (g + mu * v)          (Nesterov; plain momentum: theta - lr_t * v)

DiLoCo's defaults: lr 0.7, mu 0.9. ``lr_t`` is constant or follows a cosine
over the run's rounds. Everything is float32 on the CPU in a fixed order of
operations, each product rounded before it is added (no fused multiply-add,
which torch uses on some CPUs and not on others), so every peer that applies
the same g to the same state gets the same bits.
"""

from __future__ import annotations

import math

import torch


class OuterNesterov:
    def __init__(
        self,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        schedule: str = "constant",
        total_rounds: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"outer lr schedule {schedule!r} is not allowed: constant or cosine")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.schedule, self.total_rounds, self.min_lr_ratio = schedule, total_rounds, min_lr_ratio

    def lr_at(self, round: int) -> float:
        if self.schedule == "constant" or self.total_rounds <= 1:
            return self.lr
        progress = min(1.0, round / (self.total_rounds - 1))
        m = self.min_lr_ratio
        return self.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def step(self, theta: torch.Tensor, velocity: torch.Tensor, g: torch.Tensor, round: int) -> None:
        """Update ``theta`` and ``velocity`` (views of the global state) in place."""
        lr = self.lr_at(round)
        # every product is rounded on its own before the sum (no ``alpha=``): torch fuses ``add(x, alpha=a)``
        # into one multiply-add on some CPUs and not on others, which would give peers different bits
        velocity.mul_(self.momentum).add_(g)
        if self.nesterov:
            theta.sub_(g.add(velocity * self.momentum) * lr)
        else:
            theta.sub_(velocity * lr)
