"""Balanced local steps: how many inner steps each quorum member trains in the next round.

Every member reports its measured inner-step rate ``rate_i`` (steps per
second, an exponential moving average of its own step times) with each Sync.
For the next round the coordinator assigns, with ``H = outer.sync_every``::

    fastest = max_i rate_i                      (members with a rate)
    ratio_i = rate_i / fastest
    H_i     = H                                 ratio_i >= 1 - tolerance   (equal within measurement noise)
            = floor(H * ratio_i)                otherwise                  (finishes when the fastest does)
            = 0                                 when that is below ``min_steps``: the member sits out
    H_i     = probe = min(H, max(2, min_steps)) for a member with no rate yet

so every member finishes its compute at about the time the fastest does H
steps. A member with no rate yet (every member in round 0, a joiner) trains a
short probe round, enough steps to be measured (a process's first step does
not count): round 0 is short and a slow joiner does not hold up the round it
enters. A member that sits out trains nothing in the round and takes part in
its exchange with weight 0: it receives the mean and holds the next state
without downloading anything; it is assigned again at the next boundary
from its latest rate (which it keeps measuring with one untrained probe step
per round). ``fixed`` plans give every member H (today's rounds).

Properties (tested): deterministic for the same inputs, monotone in the rate,
bounded by 0 and H, and H for everyone when the rates are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping


@dataclass(frozen=True)
class WorkPlan:
    """The run's round plan, as every peer declares it at join (it is part of the schema hash)."""

    sync_every: int = 1  # H
    min_steps: int = 1  # outer.min_local_steps
    balanced: bool = False  # outer.local_steps=balanced
    tolerance: float = 0.1  # rates within this fraction of the fastest count as equal

    def __post_init__(self) -> None:
        if self.sync_every < 1 or not 0 <= self.min_steps <= self.sync_every or not 0 <= self.tolerance < 1:
            raise ValueError(
                f"work plan {self} is not allowed: need sync_every >= 1, 0 <= min_steps <= "
                "sync_every and 0 <= tolerance < 1"
            )


def probe_steps(plan: WorkPlan) -> int:
    """What a member with no measured rate trains in a balanced round (H in fixed plans)."""
    return min(plan.sync_every, max(2, plan.min_steps)) if plan.balanced else plan.sync_every


def assign_local_steps(rates: Mapping[str, float], plan: WorkPlan) -> Dict[str, int]:
    """H_i for every member of ``rates`` (member -> steps per second; 0 or less: not measured yet)."""
    if not plan.balanced:
        return {pid: plan.sync_every for pid in rates}
    measured = [r for r in rates.values() if r > 0 and math.isfinite(r)]
    fastest = max(measured) if measured else 0.0
    out = {}
    for pid, rate in rates.items():
        if fastest <= 0 or rate <= 0 or not math.isfinite(rate):
            out[pid] = probe_steps(plan)
            continue
        ratio = min(1.0, rate / fastest)
        steps = plan.sync_every if ratio >= 1.0 - plan.tolerance else math.floor(plan.sync_every * ratio)
        out[pid] = steps if steps >= max(1, plan.min_steps) else 0
    return out
