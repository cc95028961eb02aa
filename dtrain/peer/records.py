"""The metrics records of rounds and heals, and the clock that splits a round's time.

``round``: round, quorum_id, quorum_size, members, state_hash (of S_{r+1}),
bytes_sent / bytes_recv (outer payload), round_s (since the previous round
ended), compute_s (inner steps in it), comm_s (collectives), wait_s (Sync and
Commit calls), codec, attempts, step. ``heal``: round (of the adopted state),
donor, bytes, seconds, state_hash, reason.
"""

from __future__ import annotations

import time

from ..outer.global_state import GlobalState
from .round_engine import ExchangeResult


class RoundClock:
    """Splits wall time between inner compute and the round's exchange."""

    def __init__(self) -> None:
        self.last_round_end = time.perf_counter()
        self.compute_s = 0.0

    def exchange_starts(self) -> None:
        """The inner steps of this round are done."""
        self.compute_s += time.perf_counter() - self.last_round_end

    def restart(self) -> tuple:
        """A round (or heal) ended: (round_s, compute_s) of the one that ended; the clock starts over."""
        now = time.perf_counter()
        spent = (now - self.last_round_end, self.compute_s)
        self.last_round_end, self.compute_s = now, 0.0
        return spent


def round_record(result: ExchangeResult, state: GlobalState, clock: RoundClock, codec: str, step: int) -> dict:
    round_s, compute_s = clock.restart()
    return {
        "kind": "round",
        "round": result.round,
        "quorum_id": result.quorum_id,
        "quorum_size": len(result.members),
        "members": result.members,
        "state_hash": state.hash(),
        "bytes_sent": result.bytes_sent,
        "bytes_recv": result.bytes_recv,
        "round_s": round_s,
        "compute_s": compute_s,
        "comm_s": result.comm_s,
        "wait_s": result.wait_s,
        "codec": codec,
        "attempts": result.attempts,
        "step": step,
    }


def heal_record(result: ExchangeResult, state: GlobalState, clock: RoundClock) -> dict:
    clock.restart()
    heal = result.heal
    return {
        "kind": "heal",
        "round": result.round,
        "donor": heal.donor if heal else "",
        "bytes": heal.bytes if heal else 0,
        "seconds": heal.seconds if heal else 0.0,
        "state_hash": state.hash(),
        "reason": heal.reason if heal else "",
    }
