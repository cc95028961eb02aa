"""What a round boundary tells the trainer: the one value the outer-loop components hand back.

The trainer alone owns its stop flags, checkpoints, step counter and metrics;
a component never writes them. After each hook it gets a :class:`RoundEvent`
and acts on it:

- ``outcome``: NONE (no round here), COMMIT, HEAL, or STOP (the leader gave
  up a wait to shut down: every rank leaves the loop);
- ``step``: the inner step to continue from (a HEAL moves it to the adopted
  state's round; otherwise the step the hook was called at);
- ``stall_s``: seconds the inner steps waited for an overlapped exchange;
- ``records``: metrics records to write, in order (the leader's only);
- ``checkpoint``: write a checkpoint now (a committed round's S_{r+1}, or an
  adopted state, must be on disk before training goes on);
- ``local_steps``: balanced rounds, the inner steps this peer trains in the
  next round (what the coordinator assigned; 0: it sits the round out; -1:
  nothing assigned, H). The trainer needs nothing from it; it travels to the
  other ranks with the event;
- ``capacity_level``: ``capacity=auto``, the ladder level (the top arch) the
  peer trains within from now on (-1: unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..wire.outcomes import RoundOutcome


@dataclass
class RoundEvent:
    outcome: RoundOutcome = RoundOutcome.NONE
    step: int = 0
    stall_s: float = 0.0
    records: List[dict] = field(default_factory=list)
    checkpoint: bool = False
    local_steps: int = -1
    capacity_level: int = -1

    @property
    def changed_parameters(self) -> bool:
        """The local parameters were replaced (new global state): the other ranks must take them."""
        return self.outcome in (RoundOutcome.COMMIT, RoundOutcome.HEAL)
