"""Leader -> the peer's other ranks: what a round boundary did, then the parameters it changed.

Only the leader (rank 0) talks to the network; the other ranks wait in these
broadcasts at the same points of the schedule, so every rank leaves a round
boundary with the same outcome, step and parameters.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from ..wire.outcomes import RoundOutcome
from .round_event import RoundEvent


def share_event(event: RoundEvent, params: Iterable[torch.nn.Parameter], is_leader: bool) -> RoundEvent:
    """Every rank: the leader's outcome and step; the parameters when they changed. Other ranks get an
    event without records (metrics are the leader's) and without a checkpoint request (the leader
    writes checkpoints)."""
    info = torch.tensor([event.outcome.value, event.step, event.local_steps, event.capacity_level], dtype=torch.long)
    dist.broadcast(info, 0)
    outcome, step, local_steps, level = RoundOutcome(int(info[0])), int(info[1]), int(info[2]), int(info[3])
    if outcome in (RoundOutcome.COMMIT, RoundOutcome.HEAL):
        for p in params:
            dist.broadcast(p.data, 0)
    if is_leader:
        return event
    return RoundEvent(outcome, step, event.stall_s, local_steps=local_steps, capacity_level=level)


def share_gradients(event: RoundEvent, params: Iterable[torch.nn.Parameter], is_leader: bool) -> RoundEvent:
    """ddp baseline, every rank: the leader's outcome; then the mean gradients (COMMIT) or the adopted
    parameters (HEAL). STOP moves nothing."""
    params = list(params)
    info = torch.tensor([event.outcome.value, event.step], dtype=torch.long)
    dist.broadcast(info, 0)
    outcome, step = RoundOutcome(int(info[0])), int(info[1])
    if outcome is RoundOutcome.HEAL:
        for p in params:
            dist.broadcast(p.data, 0)
            p.grad = None
    elif outcome is not RoundOutcome.STOP:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.broadcast(p.grad, 0)
    if is_leader:
        return event
    return RoundEvent(outcome, step, event.stall_s)
