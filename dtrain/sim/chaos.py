"""The seeded chaos schedule of a simulation: what happens when, decided before the run starts.

``build_schedule`` turns the ``chaos`` and ``wan`` configs into a sorted list
of :class:`Action` (time in seconds on the chaos clock, which starts when the
first round commits). Periodic faults ``[X, Y]`` are drawn as gaps
``U(X, Y)`` from one ``random.Random(chaos.seed)``, so the same seed gives the
same times. Which peer or link an action hits is drawn when it fires, from a
generator seeded by (seed, action index), over the sorted live peers: the
same schedule against the same membership picks the same victims.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Sequence

KINDS = ("kill", "join", "coordinator_restart", "cluster_restart", "link_reset", "link_stall")


@dataclass(frozen=True, order=True)
class Action:
    t: float
    index: int
    kind: str = field(compare=False)

    def rng(self, seed: int) -> random.Random:
        return random.Random(f"{seed}:{self.index}:{self.kind}")


def _periodic(rng: random.Random, every: Sequence[float], horizon: float) -> List[float]:
    if not every:
        return []
    lo, hi = every
    out, t = [], 0.0
    while True:
        t += rng.uniform(lo, hi)
        if t > horizon:
            return out
        out.append(t)


def build_schedule(chaos, wan, horizon_s: float) -> List[Action]:
    rng = random.Random(chaos.seed)
    timed = [(t, "kill") for t in chaos.kill_at_s]
    timed += [(t, "kill") for t in _periodic(rng, chaos.kill_every_s, horizon_s)]
    timed += [(t, "join") for t in chaos.join_at_s]
    timed += [(t, "coordinator_restart") for t in chaos.coordinator_restart_at_s]
    timed += [(t, "cluster_restart") for t in chaos.cluster_restart_at_s]
    if wan.enabled:
        timed += [(t, "link_reset") for t in _periodic(rng, wan.reset_every_s, horizon_s)]
        timed += [(t, "link_stall") for t in _periodic(rng, wan.stall_every_s, horizon_s)]
    timed.sort(key=lambda x: (x[0], KINDS.index(x[1])))
    return [Action(round(t, 3), i, kind) for i, (t, kind) in enumerate(timed)]


def pick(rng: random.Random, candidates: Sequence[str]) -> str:
    return rng.choice(sorted(candidates))
