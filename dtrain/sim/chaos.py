"""The seeded chaos schedule of a simulation: what happens when, decided before the run starts.

``build_schedule`` turns the ``chaos`` and ``wan`` configs into a sorted list
of :class:`Action` (time in seconds on the chaos clock, which starts when the
first round commits). Periodic faults ``[X, Y]`` are drawn as gaps
``U(X, Y)`` from one ``random.Random(chaos.seed)``, so the same seed gives the
same times. Which peer or link an action hits is drawn when it fires, from a
generator seeded by (seed, action index), over the sorted live peers: the
same schedule against the same membership picks the same victims.

Slowdowns (``chaos.slowdown_at_s``) are decided whole before the run: the
peer of each is drawn here from the peers the run starts with (``peers``),
from a generator seeded by (seed, "slowdown", k), without repeating a peer
while some are left, and kept in :attr:`Action.peer`. When it fires, that peer
is slowed if it is running; otherwise a running peer is drawn as for a kill.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Sequence

KINDS = ("kill", "join", "coordinator_restart", "cluster_restart", "link_reset", "link_stall", "slowdown")


@dataclass(frozen=True, order=True)
class Action:
    t: float
    index: int
    kind: str = field(compare=False)
    peer: str = field(default="", compare=False)  # slowdown: the peer chosen before the run ("" for the others)

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


def slowdown_victims(seed: int, count: int, peers: Sequence[str]) -> List[str]:
    """The peer of each of ``count`` slowdowns, drawn from ``peers`` (distinct while peers are left)."""
    out: List[str] = []
    left: List[str] = []
    for k in range(count):
        if not peers:
            out.append("")
            continue
        if not left:
            left = sorted(peers)
        victim = pick(random.Random(f"{seed}:slowdown:{k}"), left)
        left.remove(victim)
        out.append(victim)
    return out


def build_schedule(chaos, wan, horizon_s: float, peers: Sequence[str] = ()) -> List[Action]:
    """The run's actions, sorted by time; ``peers``: the peers the run starts with (slowdown victims)."""
    rng = random.Random(chaos.seed)
    timed = [(t, "kill") for t in chaos.kill_at_s]
    timed += [(t, "kill") for t in _periodic(rng, chaos.kill_every_s, horizon_s)]
    timed += [(t, "join") for t in chaos.join_at_s]
    timed += [(t, "coordinator_restart") for t in chaos.coordinator_restart_at_s]
    timed += [(t, "cluster_restart") for t in chaos.cluster_restart_at_s]
    if wan.enabled:
        timed += [(t, "link_reset") for t in _periodic(rng, wan.reset_every_s, horizon_s)]
        timed += [(t, "link_stall") for t in _periodic(rng, wan.stall_every_s, horizon_s)]
    slow_at = sorted(chaos.slowdown_at_s)
    slowed = [(t, "slowdown", v) for t, v in zip(slow_at, slowdown_victims(chaos.seed, len(slow_at), peers))]
    every = [(t, kind, "") for t, kind in timed] + slowed
    every.sort(key=lambda x: (x[0], KINDS.index(x[1])))  # stable: slowdowns at one time keep their order
    return [Action(round(t, 3), i, kind, peer) for i, (t, kind, peer) in enumerate(every)]


def pick(rng: random.Random, candidates: Sequence[str]) -> str:
    return rng.choice(sorted(candidates))
