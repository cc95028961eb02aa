"""One vocabulary for what happens to members and rounds, and its one mapping onto the proto enums.

- :class:`MemberState`: a member of the coordinator is ``JOINING`` until its
  first sync of the current round, then ``ACTIVE``.
- :class:`SyncOutcome`: the coordinator's answer to a Sync: run the round with
  a ``QUORUM``, ``HEAL`` from a donor, or ``WAIT`` (call again).
- :class:`CommitDecision`: the answer to a vote: ``COMMIT`` (apply the outer
  step), ``RETRY`` (keep the pseudo-gradient, sync the same round again) or
  ``WAIT`` (votes still missing).
- :class:`RoundOutcome`: what a round boundary did to a peer: ``NONE`` (no
  round here), ``COMMIT`` (the next global state is installed), ``HEAL`` (a
  donor's state was adopted), ``STOP`` (the peer abandoned the wait to shut
  down). Its integer values travel to the peer's other ranks.

The proto enums (``SyncReply.Outcome``, ``CommitReply.Decision``) and the
member state string of ``MemberStatus`` are converted here and nowhere else:
the coordinator service and the coordinator client call these functions at
the wire edge; everything above them speaks the enums.
"""

from __future__ import annotations

import enum
from typing import Dict

from ..v1 import dtrain_pb2 as pb


class MemberState(enum.Enum):
    JOINING = "joining"
    ACTIVE = "active"


class SyncOutcome(enum.Enum):
    QUORUM = "quorum"
    HEAL = "heal"
    WAIT = "wait"


class CommitDecision(enum.Enum):
    COMMIT = "commit"
    RETRY = "retry"
    WAIT = "wait"


class RoundOutcome(enum.Enum):
    NONE = 0
    COMMIT = 1
    HEAL = 2
    STOP = 3


_SYNC: Dict[SyncOutcome, pb.SyncReply.Outcome] = {
    SyncOutcome.QUORUM: pb.SyncReply.QUORUM,
    SyncOutcome.HEAL: pb.SyncReply.HEAL,
    SyncOutcome.WAIT: pb.SyncReply.WAIT,
}
# keyed by plain int: a reply's field may hold a value the enum has no name for (unspecified, or from a newer peer)
_SYNC_BACK: Dict[int, SyncOutcome] = {v: k for k, v in _SYNC.items()}
_DECISION: Dict[CommitDecision, pb.CommitReply.Decision] = {
    CommitDecision.COMMIT: pb.CommitReply.COMMIT,
    CommitDecision.RETRY: pb.CommitReply.RETRY,
    CommitDecision.WAIT: pb.CommitReply.WAIT,
}
_DECISION_BACK: Dict[int, CommitDecision] = {v: k for k, v in _DECISION.items()}


class UnknownOutcome(ValueError):
    """A proto enum value this vocabulary has no word for (unspecified, or from a newer peer)."""


def sync_outcome_to_proto(outcome: SyncOutcome) -> pb.SyncReply.Outcome:
    return _SYNC[outcome]


def sync_outcome_from_proto(value: int) -> SyncOutcome:
    try:
        return _SYNC_BACK[value]
    except KeyError:
        raise UnknownOutcome(f"Sync outcome {value} is not one of QUORUM, HEAL, WAIT") from None


def commit_decision_to_proto(decision: CommitDecision) -> pb.CommitReply.Decision:
    return _DECISION[decision]


def commit_decision_from_proto(value: int) -> CommitDecision:
    try:
        return _DECISION_BACK[value]
    except KeyError:
        raise UnknownOutcome(f"Commit decision {value} is not one of COMMIT, RETRY, WAIT") from None


def member_state_to_proto(state: MemberState) -> str:
    return state.value


def member_state_from_proto(value: str) -> MemberState:
    try:
        return MemberState(value)
    except ValueError:
        raise UnknownOutcome(f"member state {value!r} is not one of joining, active") from None
