"""Shrinking schedules: which subnets the sandwich trains at a given step.

- ``uniform``: the full sandwich (largest, smallest, N random) from step 0.
- ``delayed`` (DepS): the largest subnet alone for the first ``delay_fraction``
  of training; then the sandwich, with the small subnets' loss weight ramped
  linearly from 0 to 1 over ``ramp_fraction`` of training.
- ``progressive`` (Once-for-All): the largest subnet alone, then one elastic
  dimension after another in ``model.progressive_order`` (e.g. kernel, depth,
  expand); dimensions not in that list (resolution) are elastic as soon as
  shrinking starts. ``progressive_fractions`` gives each phase's share of
  training (one more entry than the order has dimensions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from ..config import ConfigError


@dataclass(frozen=True)
class Plan:
    small: bool  # train the smaller subnets at all
    weight: float  # loss weight of the smaller subnets
    elastic: Optional[Tuple[str, ...]]  # dimensions sampled; None: all
    phase: str


class ShrinkSchedule:
    def __init__(self, cfg, dims, progressive_order, total_steps: int):
        self.cfg, self.dims, self.total = cfg, tuple(dims), total_steps
        self.order = tuple(progressive_order)
        if cfg.schedule == "progressive":
            fr = list(cfg.progressive_fractions)
            if len(fr) != len(self.order) + 1:
                raise ConfigError(
                    f"sandwich.progressive_fractions={fr} is not allowed: it needs "
                    f"{len(self.order) + 1} entries (full net, then {', '.join(self.order)})"
                )
            bounds, acc = [], 0.0
            for f in fr:
                acc += f
                bounds.append(int(math.floor(acc * total_steps + 1e-9)))
            self.bounds = bounds

    def at(self, step: int) -> Plan:
        cfg = self.cfg
        if cfg.schedule == "uniform":
            return Plan(True, 1.0, None, "uniform")
        if cfg.schedule == "delayed":
            start = int(cfg.delay_fraction * self.total)
            if step < start:
                return Plan(False, 0.0, None, "full")
            ramp = cfg.ramp_fraction * self.total
            w = 1.0 if ramp <= 0 else min(1.0, (step - start + 1) / ramp)
            return Plan(True, w, None, "shrink")
        phase = next((i for i, b in enumerate(self.bounds) if step < b), len(self.bounds) - 1)
        if phase == 0:
            return Plan(False, 0.0, None, "full")
        always = tuple(d for d in self.dims if d not in self.order)
        elastic = always + self.order[:phase]
        return Plan(True, 1.0, elastic, "+".join(self.order[:phase]))
