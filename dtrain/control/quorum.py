"""The coordinator's round protocol as a pure state machine (no gRPC, no I/O, no clock).

Every method takes ``now`` (seconds, monotonic) and either returns an answer
or ``None`` when the caller has to wait; answers produced for waiting callers
are collected with :meth:`QuorumMachine.take_sync_answer` and
:meth:`QuorumMachine.take_commit_answer`. The gRPC service drives it from one
event loop, persists :meth:`snapshot` whenever ``dirty`` is set (before it
releases any answer), and calls :meth:`poll` when :meth:`next_deadline` passes.
Every call first applies what time alone decides (expired leases, a passed
commit deadline), so the outcome does not depend on when ``poll`` ran.

Rounds. S_r is the global state after r committed rounds; ``committed_round``
R says which state is current. A member holding S_R calls ``sync(R, H(S_R))``.

- **Forming.** A quorum for round R forms once every *expected* live member
  has synced, or ``grace`` seconds after the first sync of the round with
  those present. It needs at least ``min_peers`` members and more than half
  of the expected live members (no split brain). Expected: members that need
  no healing. A peer that joined behind, or was told to HEAL or WAIT (behind,
  another hash, round committed without it), is downloading the state: it is
  not counted until it syncs round R. It is waited for only while the grace
  window of the round it was sent to fetch is open, so that a healer whose
  download is quicker than a round enters at the next round boundary instead
  of chasing the others forever (``heal_grace``, when longer than ``grace``,
  is how long a healer is waited for: its download puts it a little behind
  the others at the boundary of the round it fetched). The reference
  hash of S_R is the one recorded for R (from an earlier attempt), else the
  majority hash; syncers with another hash are told to HEAL from a member
  that has the reference.
- **Quorum id.** Monotonic; kept from one round to the next only while the
  membership has not changed and the last decision was a commit; bumped
  otherwise (membership change, failed commit).
- **Voting.** Every quorum member votes ``commit(R, qid, ok)``. All ok before
  ``commit_timeout`` -> COMMIT to all and R += 1. A not-ok vote, a missed
  deadline, a member leaving or expiring, or a member syncing again -> RETRY
  to all: they keep their pseudo-gradients and sync round R again.
- **Behind.** A member syncing r < R is told to HEAL from a holder of S_R
  (holders: the committed quorum, and members that synced R with the
  reference hash), spread so that no holder serves every joiner; WAIT while
  no holder is known (after a coordinator restart). A peer reporting a round
  beyond R (at join or sync) is refused (OUT_OF_RANGE): the
  coordinator runs on the wrong state dir, and no peer is healed backwards.
- **Members.** Join registers a peer (state ``joining``) under a lease renewed
  by every call; its first sync of round R makes it ``active``. Joiners that
  must heal do not hold up quorums. A peer id held by a live peer of another
  incarnation is refused (ALREADY_EXISTS) until that lease expires; the same
  incarnation may join again (idempotent). A call from a peer whose lease has
  expired is refused (PERMISSION_DENIED: join again).

**Accusations need evidence.** A quorum member that received garbage from
another member (or saw it clipped hard round after round) reports it, about
the quorum being voted on or the one that just retried in this round, with
the hash of the bytes it judged bad (``evidence``, recorded in the event
log). One member's word is not enough: the culprit is excluded only when a
second member of the same quorum reports it too (**confirmed**), or when the
culprit's own vote in that quorum is not ok (its collective failed as well);
until then the accusation is pending (``report_pending``). An excluded
culprit is removed like an expired member and kept out of the round's
quorums when it re-joins, so the retry forms without it; once the round
commits it heals like any peer that is behind. An accusation is **settled**
when no more reports about its quorum are accepted (the round commits, or a
retry's quorum is decided); one still pending then, in a quorum that had a
third member who could have confirmed it, counts against the accuser, and an
accuser with ``max_unconfirmed_reports`` such accusations in a row is itself
excluded (a confirmed accusation resets its count). In a quorum of two, a
report is confirmed only by the culprit's own failed vote, and an
unconfirmed one costs the accuser nothing: two members cannot outvote each
other. Not covered: a member that votes not ok in every round stalls the
run without accusing anyone (every vote is a veto).

Every membership change (join, activation, leave, expiry, exclusion) is recorded in
``events`` for the coordinator's JSON-lines log.

Only committed rounds, the reference hash of S_R where known, the quorum-id
counter, the schema hash and the commit history are durable (``snapshot``);
members are soft state and re-join after a coordinator restart.
"""

from __future__ import annotations

import functools
import heapq
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from ..wire.outcomes import CommitDecision, MemberState, SyncOutcome
from .work_plan import WorkPlan, assign_local_steps

_PEER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ADDRESS = re.compile(r"[A-Za-z0-9._\-\[\]:]{1,250}:[0-9]{1,5}")
_LABEL = re.compile(r"[A-Za-z0-9._-]{0,64}")  # region
_TOKENISH = re.compile(r"[A-Za-z0-9._-]{1,64}")  # incarnation
MAX_HASH = 128
MAX_SLICE = 16384  # a top arch as canonical JSON
PERSISTED_HISTORY = 32  # commits kept in state.json: enough to answer re-asked commits after a restart
MAX_REASON = 200
MAX_RATE = 1e9  # inner steps per second a member may report


class Refusal(Exception):
    """A request the protocol refuses; ``code`` is a gRPC status code name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Params:
    min_peers: int = 1
    lease_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    grace: float = 1.0
    heal_grace: float = 0.0  # how long a round's quorum waits for peers healing to it (0: grace)
    commit_timeout: float = 30.0
    history: int = 1000
    schema_hash: str = ""  # pinned; empty: adopt (and persist) the first joiner's
    adaptive_grace: bool = True  # the grace window follows how late members have been arriving
    grace_cap: float = 30.0  # ... but never longer than this
    max_unconfirmed_reports: int = 3  # an accuser with this many unconfirmed accusations in a row is excluded


@dataclass
class Member:
    peer_id: str
    incarnation: str
    address: str
    world_size: int
    region: str
    last_seen: float
    joined_at: float
    state: MemberState = MemberState.JOINING
    round: int = 0
    state_hash: str = ""
    needs_heal: bool = False  # joined behind or told to heal: not expected until it syncs the current round
    plan: WorkPlan = field(default_factory=WorkPlan)  # the round plan it declared at join
    step_rate: float = 0.0  # inner steps per second it reported with its last sync (0: not measured)
    steps: int = 0  # inner steps it trained in the round it last synced
    samples: int = 0  # samples it trained then: its weight in that round's mean
    slice: str = ""  # capacity: the top arch it trains within (canonical JSON); "": everything
    # its contribution to the last round it committed in: (round, norm, clip factor), median over the voters
    contribution: Optional[Tuple[int, float, float]] = None


@dataclass(frozen=True)
class Donor:
    peer_id: str
    address: str
    round: int
    state_hash: str


@dataclass(frozen=True)
class QuorumInfo:
    quorum_id: int
    round: int
    members: Tuple[Tuple[str, str, int, str], ...]  # (peer_id, address, world_size, region), ring order
    state_hash: str
    commit_timeout: float
    # per member, in ring order: (steps and samples it trained in this round, steps assigned to it for the
    # next round, the rate that assignment came from)
    work: Tuple[Tuple[int, int, int, float], ...] = ()
    slices: Tuple[str, ...] = ()  # per member, ring order: the top arch it trains within ("": everything)

    @functools.cached_property
    def ids(self) -> Tuple[str, ...]:
        return tuple(m[0] for m in self.members)

    @functools.cached_property
    def id_set(self) -> frozenset:
        return frozenset(self.ids)


@dataclass(frozen=True)
class SyncAnswer:
    outcome: SyncOutcome
    round: int  # the round the answered sync was for
    quorum: Optional[QuorumInfo] = None
    donor: Optional[Donor] = None
    reason: str = ""
    next_steps: Optional[int] = None  # HEAL: the inner steps assigned to the healer for the round it enters


@dataclass(frozen=True)
class CommitAnswer:
    decision: CommitDecision  # COMMIT | RETRY
    round: int
    quorum_id: int
    reason: str = ""


@dataclass
class CommitRecord:
    round: int
    quorum_id: int
    members: List[str]
    state_hash: str
    time: float  # wall clock (unix seconds), for humans


def _record_dict(r: CommitRecord) -> dict:
    """A commit record as plain data (cheaper than dataclasses.asdict's deep copies)."""
    return {
        "round": r.round,
        "quorum_id": r.quorum_id,
        "members": list(r.members),
        "state_hash": r.state_hash,
        "time": r.time,
    }


@dataclass
class JoinResult:
    committed_round: int
    committed_state_hash: str
    must_heal: bool
    donor: Optional[Donor]
    quorum_id: int


@dataclass
class _Accusation:
    """Reports about one culprit in one quorum: accuser -> the hash of the bytes it judged bad."""

    quorum: QuorumInfo
    culprit: str
    evidence: Dict[str, str] = field(default_factory=dict)


@dataclass
class _Voting:
    quorum: QuorumInfo
    deadline: float
    votes: Dict[str, bool] = field(default_factory=dict)
    seen: Dict[str, Dict[str, Tuple[float, float]]] = field(default_factory=dict)  # voter -> member -> (norm, clip)
    first_sync_at: float = 0.0  # when the round's first sync arrived (late syncs are measured from it)


class QuorumMachine:
    def __init__(self, params: Params, snapshot: Optional[dict] = None, wall_clock: Callable[[], float] = time.time):
        self.params = params
        self.wall_clock = wall_clock  # unix seconds for the commit history (for humans); injected like `now`
        self.members: Dict[str, Member] = {}
        self.committed_round = 0
        self.known_hash = ""  # H(S_committed_round) where a quorum established it
        self.quorum_id = 0
        self.schema_hash = params.schema_hash
        self.history: List[CommitRecord] = []
        if snapshot:
            self._restore(snapshot)
        self.epoch = 0  # bumped on every membership change
        self.holders: Set[str] = set()  # members known to hold S_committed_round
        self.donor_load: Dict[str, int] = {}
        self.healing: Dict[str, int] = {}  # peer -> the round whose state it was sent to fetch
        self.excluded: Dict[str, int] = {}  # peer -> the round it was excluded from (reported for garbage)
        self.accusations: Dict[Tuple[int, str], _Accusation] = {}  # pending: (quorum id, culprit) -> reports
        self.not_ok: Set[Tuple[int, str]] = set()  # (quorum id, member) whose vote was not ok, this round
        self.unconfirmed: Dict[str, int] = {}  # accuser -> its unconfirmed accusations in a row
        self.last_failed: Optional[QuorumInfo] = None  # the latest quorum that retried
        self.syncs: Dict[str, str] = {}  # collecting: peer -> hash synced for committed_round
        self.first_sync_at: Optional[float] = None
        self.grace_spent = False  # a formation attempt ran after the grace window: no timer needed
        self.round_spread = 0.0  # this round: the latest sync's delay after its first (late syncs included)
        self.spread_ema = 0.0  # moving average of round_spread over committed rounds (adaptive grace)
        self.late: Dict[str, str] = {}  # synced while a quorum of the same round was voting
        self.voting: Optional[_Voting] = None
        self.last_quorum: Optional[Tuple[frozenset, int, CommitDecision]] = None  # (ids, epoch, decision)
        self._sync_answers: Dict[str, SyncAnswer] = {}
        self._commit_answers: Dict[str, CommitAnswer] = {}
        self.posted: Set[str] = set()
        self._leases: List[Tuple[float, str]] = []  # (last_seen, peer) heap; stale entries are skipped
        self.dirty = False
        self.events: List[dict] = []

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> dict:
        return {
            "version": 1,
            "committed_round": self.committed_round,
            "state_hash": self.known_hash,
            "quorum_id": self.quorum_id,
            "schema_hash": self.schema_hash,
            "history": [_record_dict(r) for r in self.history[-PERSISTED_HISTORY:]],
        }

    def _restore(self, s: dict) -> None:
        self.committed_round = int(s["committed_round"])
        self.known_hash = str(s.get("state_hash", ""))
        self.quorum_id = int(s["quorum_id"])
        if not self.schema_hash:
            self.schema_hash = str(s.get("schema_hash", ""))
        self.history = [CommitRecord(**r) for r in s.get("history", [])]

    def _event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, **fields})

    def drain_events(self) -> List[dict]:
        out, self.events = self.events, []
        return out

    # ------------------------------------------------------------------ membership
    def _member(self, peer_id: str, incarnation: str, now: float) -> Member:
        m = self.members.get(peer_id)
        if m is None:
            raise Refusal(
                "PERMISSION_DENIED",
                f"peer {peer_id!r} is not a member (never joined, left, or its lease expired): join again",
            )
        if m.incarnation != incarnation:
            raise Refusal(
                "PERMISSION_DENIED",
                f"peer {peer_id!r}: incarnation {incarnation!r} is not the member's current one: join again",
            )
        self._touch(m, now)
        return m

    def _touch(self, m: Member, now: float) -> None:
        """Renew a lease; the heap keeps expiry checks O(log n) per call."""
        m.last_seen = now
        heapq.heappush(self._leases, (now, m.peer_id))

    def join(
        self,
        peer_id: str,
        incarnation: str,
        address: str,
        schema_hash: str,
        world_size: int,
        region: str,
        round: int,
        state_hash: str,
        now: float,
        plan: Optional[WorkPlan] = None,
        slice: str = "",
    ) -> JoinResult:
        if not _PEER_ID.fullmatch(peer_id or ""):
            raise Refusal(
                "INVALID_ARGUMENT", f"peer_id={peer_id!r} is not allowed: 1-128 letters, digits, '.', '_' or '-'"
            )
        if not _ADDRESS.fullmatch(address or ""):
            raise Refusal("INVALID_ARGUMENT", f"address={(address or '')[:80]!r} is not allowed: use host:port")
        if not _TOKENISH.fullmatch(incarnation or ""):
            raise Refusal("INVALID_ARGUMENT", "incarnation must be 1-64 letters, digits, '.', '_' or '-'")
        if not _LABEL.fullmatch(region or ""):
            raise Refusal(
                "INVALID_ARGUMENT",
                f"region={(region or '')[:80]!r} is not allowed: up to 64 letters, digits, '.', '_' or '-'",
            )
        if len(state_hash or "") > MAX_HASH or len(schema_hash or "") > MAX_HASH:
            raise Refusal("INVALID_ARGUMENT", f"hashes are at most {MAX_HASH} characters")
        if len(slice or "") > MAX_SLICE:
            raise Refusal("INVALID_ARGUMENT", f"slice is at most {MAX_SLICE} characters")
        if world_size < 1:
            raise Refusal("INVALID_ARGUMENT", f"world_size={world_size} is not allowed: must be >= 1")
        if not schema_hash:
            raise Refusal("INVALID_ARGUMENT", "schema_hash must not be empty")
        if self.schema_hash and schema_hash != self.schema_hash:
            raise Refusal(
                "FAILED_PRECONDITION",
                f"schema hash {schema_hash[:12]}... differs from the run's {self.schema_hash[:12]}...: "
                "the peer runs other code or another model config",
            )
        self._advance(now)
        R = self.committed_round
        if int(round) > R:
            raise Refusal(
                "OUT_OF_RANGE",
                f"peer {peer_id!r} holds round {round} but only {R} rounds are committed here: "
                "start the coordinator on the run's state_dir",
            )
        old = self.members.get(peer_id)
        if old is not None and old.incarnation != incarnation:
            left = self.params.lease_timeout - (now - old.last_seen)
            raise Refusal(
                "ALREADY_EXISTS",
                f"peer id {peer_id!r} is held by a live peer (incarnation "
                f"{old.incarnation!r}); its lease expires in {max(left, 0):.1f}s",
            )
        if not self.schema_hash:
            self.schema_hash = schema_hash
            self.dirty = True
        if old is None:
            self.members[peer_id] = Member(
                peer_id,
                incarnation,
                address,
                int(world_size),
                region,
                now,
                now,
                round=int(round),
                state_hash=state_hash,
                plan=plan or WorkPlan(),
                slice=slice or "",
            )
            self._touch(self.members[peer_id], now)
            self.epoch += 1
            self._event(
                "join", peer_id=peer_id, address=address, region=region, world_size=int(world_size), round=int(round)
            )
        else:
            old.address, old.world_size, old.region = address, int(world_size), region
            old.plan, old.slice = plan or WorkPlan(), slice or ""
            self._touch(old, now)
        up_to_date = int(round) == R and (
            state_hash == self.known_hash if self.known_hash else (R == 0 or bool(state_hash))
        )
        if R == 0 and not self.known_hash and not self.history:
            up_to_date = True  # a fresh run: every peer starts from the seeded initial state
        if self.excluded.get(peer_id) == R:
            up_to_date = False  # excluded for garbage: out of this round; it heals once the round commits
        self.members[peer_id].needs_heal = not up_to_date
        donor = None
        if not up_to_date:  # what it reports now supersedes an earlier sync
            self.holders.discard(peer_id)
            self.syncs.pop(peer_id, None)
            self.late.pop(peer_id, None)
            if not self.syncs:
                self.first_sync_at = None
            donor = self._pick_donor(exclude=peer_id)
            if donor is not None:
                self.healing[peer_id] = donor.round
        self._try_form(now)  # the expected set may have shrunk
        return JoinResult(R, self.known_hash, not up_to_date, donor, self.quorum_id)

    def heartbeat(self, peer_id: str, incarnation: str, now: float) -> Tuple[int, int]:
        self._advance(now)
        self._member(peer_id, incarnation, now)
        return self.committed_round, self.quorum_id

    def leave(self, peer_id: str, incarnation: str, now: float, reason: str = "") -> None:
        self._advance(now)
        m = self.members.get(peer_id)
        if m is None or m.incarnation != incarnation:
            return  # idempotent
        self._remove([peer_id], now, "leave", reason or "left")

    def report(
        self,
        peer_id: str,
        incarnation: str,
        round: int,
        quorum_id: int,
        culprit: str,
        reason: str,
        now: float,
        evidence: str = "",
    ) -> bool:
        """A quorum member accuses another one (garbage, or clipped hard too often), with ``evidence``:
        the hash of the bytes it judged bad. Only reports about the quorum being voted on (or the one that
        just retried in this round) count. The culprit is excluded (removed; it must re-join and heal, and
        the retry forms without it) once the accusation is confirmed: a second member's report, or the
        culprit's own not-ok vote in that quorum (module docstring). Returns whether it was excluded now."""
        self._advance(now)
        self._member(peer_id, incarnation, now)
        why = (reason or "no reason given")[:MAX_REASON]
        evidence = (evidence or "")[:MAX_HASH]
        # the quorum being voted on, or the one that just failed in this round (the culprit's
        # own not-ok vote may have decided the retry before the receivers' reports arrived)
        q = self.voting.quorum if self.voting is not None else self.last_failed
        if (
            q is None
            or q.quorum_id != quorum_id
            or round != q.round
            or round != self.committed_round
            or peer_id not in q.id_set
            or culprit not in q.id_set
            or culprit == peer_id
        ):
            self._event(
                "report_ignored",
                peer_id=peer_id,
                culprit=culprit,
                round=int(round),
                quorum_id=int(quorum_id),
                reason=why,
                evidence=evidence,
            )
            return False
        if self.excluded.get(culprit) == self.committed_round:
            return True  # already excluded (confirmed by someone else)
        acc = self.accusations.setdefault((q.quorum_id, culprit), _Accusation(q, culprit))
        acc.evidence[peer_id] = evidence
        self._event(
            "report",
            peer_id=peer_id,
            culprit=culprit,
            round=int(round),
            quorum_id=int(quorum_id),
            reason=why,
            evidence=evidence,
        )
        return self._judge(acc, now, why)

    def _judge(self, acc: _Accusation, now: float, why: str) -> bool:
        """Exclude the culprit of a confirmed accusation; True when it was excluded."""
        accusers = sorted(acc.evidence)
        own_vote_failed = (acc.quorum.quorum_id, acc.culprit) in self.not_ok
        if len(accusers) < 2 and not own_vote_failed:
            self._event(
                "report_pending",
                culprit=acc.culprit,
                quorum_id=acc.quorum.quorum_id,
                accusers=accusers,
            )
            return False
        del self.accusations[(acc.quorum.quorum_id, acc.culprit)]
        for accuser in accusers:
            self.unconfirmed.pop(accuser, None)
        confirmation = "its own vote failed" if own_vote_failed and len(accusers) < 2 else "confirmed"
        self.excluded[acc.culprit] = self.committed_round
        if acc.culprit in self.members:
            by = ", ".join(repr(a) for a in accusers)
            self._remove([acc.culprit], now, "exclude", f"reported by {by} ({confirmation}): {why}")
        return True

    def _settle(self, now: float, keep: Optional[int] = None) -> None:
        """Accusations about quorums other than ``keep`` can no longer be confirmed: each one pending
        counts against its accusers where a third member could have confirmed it."""
        stale = sorted(key for key in self.accusations if key[0] != keep)
        strikes: List[str] = []
        for key in stale:
            acc = self.accusations.pop(key)
            if len(acc.quorum.ids) < 3 or acc.culprit not in self.members:
                continue  # two members: nobody could have confirmed it; a culprit gone since: it may have been right
            for accuser in sorted(acc.evidence):
                self.unconfirmed[accuser] = self.unconfirmed.get(accuser, 0) + 1
                self._event(
                    "report_unconfirmed",
                    peer_id=accuser,
                    culprit=acc.culprit,
                    quorum_id=acc.quorum.quorum_id,
                    unconfirmed=self.unconfirmed[accuser],
                )
                if self.unconfirmed[accuser] >= self.params.max_unconfirmed_reports and accuser not in strikes:
                    strikes.append(accuser)
        self.not_ok = {(qid, pid) for qid, pid in self.not_ok if qid == keep}
        for accuser in strikes:
            n = self.unconfirmed.pop(accuser)
            if accuser in self.members:
                self._remove([accuser], now, "exclude", f"{n} accusations in a row that no other member confirmed")

    def expire(self, now: float) -> List[str]:
        gone, lease = [], self.params.lease_timeout
        while self._leases and now - self._leases[0][0] > lease:
            seen, pid = heapq.heappop(self._leases)
            m = self.members.get(pid)
            if m is not None and m.last_seen == seen and pid not in gone:  # not renewed since
                gone.append(pid)
        gone.sort()
        if gone:
            self._remove(gone, now, "expire", f"lease expired ({self.params.lease_timeout:g}s without a call)")
        return gone

    def _remove(self, peer_ids: List[str], now: float, kind: str, reason: str) -> None:
        """Drop members, all of them before anything is decided (no quorum forms with a gone peer)."""
        hit = []
        for peer_id in peer_ids:
            self.members.pop(peer_id, None)
            self.epoch += 1
            self.holders.discard(peer_id)
            self.healing.pop(peer_id, None)
            self.syncs.pop(peer_id, None)
            self.late.pop(peer_id, None)
            self._sync_answers.pop(peer_id, None)
            self._commit_answers.pop(peer_id, None)
            self.posted.add(peer_id)  # wake its held calls: they answer WAIT and the peer re-joins
            self._event(kind, peer_id=peer_id, reason=reason)
            if self.voting is not None and peer_id in self.voting.quorum.id_set:
                hit.append(peer_id)
        if not self.syncs:
            self.first_sync_at = None
        if hit:
            self._decide_retry(now, f"member {', '.join(repr(p) for p in hit)} is gone ({reason})")
        self._try_form(now)

    def _advance(self, now: float) -> None:
        """Apply what time alone decides: expired leases, then a passed commit deadline."""
        self.expire(now)
        v = self.voting
        if v is not None and now >= v.deadline:
            missing = sorted(set(v.quorum.ids) - set(v.votes))
            self._decide_retry(now, f"commit deadline passed; no vote from {', '.join(missing) or 'nobody'}")

    # ------------------------------------------------------------------ donors
    def _pick_donor(self, exclude: str) -> Optional[Donor]:
        cands = sorted(pid for pid in self.holders if pid != exclude and pid in self.members)
        if not cands:
            return None
        pid = min(cands, key=lambda c: (self.donor_load.get(c, 0), c))
        self.donor_load[pid] = self.donor_load.get(pid, 0) + 1
        m = self.members[pid]
        return Donor(pid, m.address, self.committed_round, self.known_hash)

    def _heal(self, peer_id: str, round: int, why: str) -> SyncAnswer:
        """HEAL (or WAIT while no holder exists) answering a sync of ``round``."""
        m = self.members.get(peer_id)
        if m is not None:
            m.needs_heal = True  # downloading: not expected at a sync until it syncs round R
        self.holders.discard(peer_id)
        donor = self._pick_donor(exclude=peer_id)
        if donor is None:
            return SyncAnswer(SyncOutcome.WAIT, round, reason=f"{why}; no up-to-date donor yet")
        self.healing[peer_id] = donor.round
        return SyncAnswer(SyncOutcome.HEAL, round, donor=donor, reason=why, next_steps=self._healer_steps(peer_id))

    def _healer_steps(self, peer_id: str) -> Optional[int]:
        """A healer's assignment for the round it enters, from every member's latest rate (so a slow peer
        that missed a quorum does not come back with a full H); None when it has no rate yet."""
        m = self.members.get(peer_id)
        if m is None or m.step_rate <= 0:
            return None
        rates = {pid: other.step_rate for pid, other in self.members.items()}
        return assign_local_steps(rates, m.plan)[peer_id]

    # ------------------------------------------------------------------ sync
    def sync(
        self,
        peer_id: str,
        incarnation: str,
        round: int,
        state_hash: str,
        now: float,
        step_rate: float = 0.0,
        steps: int = 0,
        samples: int = 0,
    ) -> Optional[SyncAnswer]:
        """``step_rate``: the member's measured inner steps per second; ``steps`` / ``samples``: what it
        trained in this round (its weight in the mean)."""
        self._advance(now)
        m = self._member(peer_id, incarnation, now)
        if not (math.isfinite(step_rate) and 0 <= step_rate <= MAX_RATE) or steps < 0 or samples < 0:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"peer {peer_id!r}: step_rate={step_rate!r} must be in [0, {MAX_RATE:g}], steps and samples >= 0",
            )
        ready = self._sync_answers.get(peer_id)
        if ready is not None and ready.round == round:
            return self._sync_answers.pop(peer_id)
        self._sync_answers.pop(peer_id, None)
        R = self.committed_round
        if round > R:
            raise Refusal(
                "OUT_OF_RANGE",
                f"peer {peer_id!r} holds round {round} but only {R} rounds are committed here: "
                "start the coordinator on the run's state_dir",
            )
        if not state_hash or len(state_hash) > MAX_HASH:
            raise Refusal("INVALID_ARGUMENT", f"peer {peer_id!r}: state_hash must be 1-{MAX_HASH} characters")
        self.healing.pop(peer_id, None)
        if self.voting is not None and peer_id in self.voting.quorum.id_set:
            self._decide_retry(now, f"member {peer_id!r} synced again")
        m.round, m.state_hash = int(round), state_hash
        m.step_rate, m.steps, m.samples = float(step_rate), int(steps), int(samples)
        if round < R:
            self.syncs.pop(peer_id, None)
            self.late.pop(peer_id, None)
            if not self.syncs:
                self.first_sync_at = None
            answer = self._heal(peer_id, round, f"behind: holds round {round}, committed is {R}")
            self._try_form(now)  # it is no longer expected
            return answer
        m.needs_heal = False
        if m.state is not MemberState.ACTIVE:
            m.state = MemberState.ACTIVE
            self.epoch += 1
            self._event("active", peer_id=peer_id, round=int(round))
        if self.first_sync_at is not None and round == R:
            self.round_spread = max(self.round_spread, now - self.first_sync_at)
        if self.voting is not None:  # (also when the retry above formed a quorum from late syncs)
            if self.voting.quorum.round == R:
                self.round_spread = max(self.round_spread, now - self.voting.first_sync_at)
            self.late[peer_id] = state_hash
            self.syncs.pop(peer_id, None)
            return None
        self.syncs[peer_id] = state_hash
        if self.first_sync_at is None:
            self.first_sync_at, self.grace_spent = now, False
        self._try_form(now)
        return self._sync_answers.pop(peer_id, None)

    def _post_sync(self, peer_id: str, answer: SyncAnswer) -> None:
        self._sync_answers[peer_id] = answer
        self.posted.add(peer_id)

    def _post_commit(self, peer_id: str, answer: CommitAnswer) -> None:
        self._commit_answers[peer_id] = answer
        self.posted.add(peer_id)

    def drain_posted(self) -> Set[str]:
        """Peers with answers posted since the last drain (the service wakes only their calls)."""
        out, self.posted = self.posted, set()
        return out

    def take_sync_answer(self, peer_id: str, round: int) -> Optional[SyncAnswer]:
        a = self._sync_answers.get(peer_id)
        if a is not None and a.round == round:
            return self._sync_answers.pop(peer_id)
        return None

    def _expected(self) -> Set[str]:
        """Members a quorum waits for and counts: those that need no healing."""
        return {pid for pid, m in self.members.items() if not m.needs_heal}

    def _try_form(self, now: float) -> None:
        if self.voting is not None or not self.syncs:
            return
        active = self._expected()
        present = {pid for pid in self.syncs if pid in self.members and self.excluded.get(pid) != self.committed_round}
        healers = {pid for pid, r in self.healing.items() if r == self.committed_round and pid in self.members}
        if not (active | healers) <= present and (
            self.first_sync_at is None or now < self._wait_until(self.first_sync_at, healers, present)
        ):
            return
        self.grace_spent = True  # from now on only events (syncs, removals) can make it form
        counts: Dict[str, int] = {}
        for pid in present:
            counts[self.syncs[pid]] = counts.get(self.syncs[pid], 0) + 1
        if self.known_hash and self.known_hash in counts:
            ref = self.known_hash
        else:
            ref = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        matching = sorted(pid for pid in present if self.syncs[pid] == ref)
        if len(matching) < self.params.min_peers or 2 * len(matching) <= len(active):
            return
        ids = frozenset(matching)
        keep = (
            self.last_quorum is not None
            and self.last_quorum[0] == ids
            and self.last_quorum[1] == self.epoch
            and self.last_quorum[2] is CommitDecision.COMMIT
        )
        if not keep or self.quorum_id == 0:
            self.quorum_id += 1
            self.dirty = True
        if self.known_hash != ref:
            self.known_hash = ref
            self.dirty = True
        ordered = sorted(matching, key=lambda pid: (self.members[pid].region, pid))
        plan = self.members[ordered[0]].plan  # one plan per run (it is part of the schema hash)
        assigned = assign_local_steps({pid: self.members[pid].step_rate for pid in ordered}, plan)
        q = QuorumInfo(
            self.quorum_id,
            self.committed_round,
            tuple(
                (pid, self.members[pid].address, self.members[pid].world_size, self.members[pid].region)
                for pid in ordered
            ),
            ref,
            self.params.commit_timeout,
            tuple(
                (self.members[pid].steps, self.members[pid].samples, assigned[pid], self.members[pid].step_rate)
                for pid in ordered
            ),
            tuple(self.members[pid].slice for pid in ordered),
        )
        self.holders |= set(matching)
        self.voting = _Voting(
            q, now + self.params.commit_timeout, first_sync_at=now if self.first_sync_at is None else self.first_sync_at
        )
        self._event(
            "quorum",
            quorum_id=q.quorum_id,
            round=q.round,
            members=list(q.ids),
            state_hash=ref,
            steps={pid: w[0] for pid, w in zip(q.ids, q.work)},
            next_steps={pid: w[2] for pid, w in zip(q.ids, q.work)},
        )
        for pid in matching:
            self._post_sync(pid, SyncAnswer(SyncOutcome.QUORUM, q.round, quorum=q))
        for pid in sorted(present - ids):
            self._post_sync(
                pid,
                self._heal(
                    pid, q.round, f"state hash {self.syncs[pid][:12]}... differs from the majority's {ref[:12]}..."
                ),
            )
        self.syncs, self.first_sync_at = {}, None

    def grace(self) -> float:
        """The grace window: ``params.grace``, or, adaptive, long enough for how late members have been
        arriving (twice the moving average of a round's spread between its first and last sync), capped
        at ``params.grace_cap``."""
        if not self.params.adaptive_grace:
            return self.params.grace
        return min(max(self.params.grace, 2.0 * self.spread_ema), max(self.params.grace, self.params.grace_cap))

    def _wait_until(self, first_sync_at: float, healers: Set[str], present: Set[str]) -> float:
        """When the time-based wait of a round ends: grace, or heal_grace while a healer is missing.

        ``first_sync_at``: ``self.first_sync_at``, passed by callers that have checked it is set."""
        wait = self.grace()
        if healers - present:
            wait = max(wait, self.params.heal_grace)
        return first_sync_at + wait

    # ------------------------------------------------------------------ commit
    def _committed_by(self, round: int, quorum_id: int) -> bool:
        return any(r.round == round and r.quorum_id == quorum_id for r in reversed(self.history))

    def commit(
        self,
        peer_id: str,
        incarnation: str,
        round: int,
        quorum_id: int,
        ok: bool,
        now: float,
        reason: str = "",
        contributions: Optional[Dict[str, Tuple[float, float]]] = None,
    ) -> Optional[CommitAnswer]:
        """A vote. ``contributions``: what this voter saw each member contribute (norm, clip factor); on
        commit every member's is the median over the voters that sent one (one voter cannot move it)."""
        self._advance(now)
        if self._committed_by(round, quorum_id):  # idempotent, for anyone (also after a restart)
            m = self.members.get(peer_id)
            if m is not None and m.incarnation == incarnation:
                self._touch(m, now)
                self.take_commit_answer(peer_id, round, quorum_id)
            return CommitAnswer(CommitDecision.COMMIT, round, quorum_id, "already committed")
        self._member(peer_id, incarnation, now)
        ready = self.take_commit_answer(peer_id, round, quorum_id)
        if ready is not None:
            return ready
        self._commit_answers.pop(peer_id, None)  # an uncollected answer for another quorum is obsolete
        v = self.voting
        if (
            v is None
            or round != self.committed_round
            or quorum_id != v.quorum.quorum_id
            or peer_id not in v.quorum.id_set
        ):
            current = v.quorum.quorum_id if v is not None else self.quorum_id
            raise Refusal(
                "ABORTED",
                f"stale commit: round {round} quorum {quorum_id} is not being voted on "
                f"(committed round {self.committed_round}, quorum {current})",
            )
        v.votes[peer_id] = bool(ok)
        if contributions:
            v.seen[peer_id] = {
                pid: (float(norm), float(clip))
                for pid, (norm, clip) in contributions.items()
                if pid in v.quorum.id_set and math.isfinite(norm) and math.isfinite(clip)
            }
        if not ok:
            why = (reason or "no reason given")[:MAX_REASON]
            self.not_ok.add((quorum_id, peer_id))
            acc = self.accusations.get((quorum_id, peer_id))
            if acc is not None:  # accused, and its own vote fails: confirmed (removing it decides the retry)
                self._judge(acc, now, f"and voted not ok: {why}")
            self._decide_retry(now, f"member {peer_id!r} voted not ok: {why}")
        elif len(v.votes) == len(v.quorum.ids):  # votes come only from members; a not-ok one decided above
            self._decide_commit(now, v)
        return self.take_commit_answer(peer_id, round, quorum_id)

    def take_commit_answer(self, peer_id: str, round: int, quorum_id: int) -> Optional[CommitAnswer]:
        a = self._commit_answers.get(peer_id)
        if a is not None and (a.round, a.quorum_id) == (round, quorum_id):
            return self._commit_answers.pop(peer_id)
        return None

    def _drop_answers_of(self, q: QuorumInfo) -> None:
        for pid in q.ids:
            a = self._sync_answers.get(pid)
            if a is not None and a.quorum is not None and a.quorum.quorum_id == q.quorum_id:
                del self._sync_answers[pid]

    def _decide_commit(self, now: float, v: _Voting) -> None:
        """Commit the vote ``v`` (``self.voting``, whose votes are all in and ok)."""
        q = v.quorum
        self._drop_answers_of(q)
        self.history.append(CommitRecord(q.round, q.quorum_id, list(q.ids), q.state_hash, self.wall_clock()))
        del self.history[: max(0, len(self.history) - self.params.history)]
        self.committed_round = q.round + 1
        self.known_hash = ""
        self.holders = {pid for pid in q.ids if pid in self.members}
        self.donor_load = {}
        self.excluded = {pid: r for pid, r in self.excluded.items() if r >= self.committed_round}
        self.last_failed = None
        self.last_quorum = (frozenset(q.ids), self.epoch, CommitDecision.COMMIT)
        self.voting = None
        self.syncs, self.first_sync_at = {}, None  # (empty: syncs during voting go to ``late``)
        self.spread_ema = 0.7 * self.spread_ema + 0.3 * self.round_spread if self.spread_ema else self.round_spread
        self.round_spread = 0.0
        self.dirty = True
        for pid in q.ids:
            if pid in self.members:
                self.members[pid].round = self.committed_round
                seen = sorted(s[pid] for s in v.seen.values() if pid in s)
                if seen:
                    norm = statistics.median_low(n for n, _ in seen)
                    clip = statistics.median_low(c for _, c in seen)
                    self.members[pid].contribution = (q.round, norm, clip)
            self._post_commit(pid, CommitAnswer(CommitDecision.COMMIT, q.round, q.quorum_id))
        self._event("commit", round=q.round, quorum_id=q.quorum_id, members=list(q.ids), state_hash=q.state_hash)
        late, self.late = self.late, {}
        for pid in sorted(late):
            if pid in self.members:
                self._post_sync(pid, self._heal(pid, q.round, f"round {q.round} committed without this peer"))
        self._settle(now)

    def _decide_retry(self, now: float, reason: str) -> None:
        v = self.voting
        if v is None:
            return
        q = v.quorum
        self.last_failed = q
        self._drop_answers_of(q)
        self.last_quorum = (frozenset(q.ids), self.epoch, CommitDecision.RETRY)
        self.voting = None
        for pid in q.ids:
            if pid in self.members:
                self._post_commit(pid, CommitAnswer(CommitDecision.RETRY, q.round, q.quorum_id, reason))
        self._event("retry", round=q.round, quorum_id=q.quorum_id, reason=reason)
        late, self.late = self.late, {}
        self.syncs = {pid: h for pid, h in late.items() if pid in self.members}
        self.first_sync_at, self.grace_spent = (now if self.syncs else None), False
        self._settle(now, keep=q.quorum_id)  # reports about q are still accepted until the next decision
        self._try_form(now)

    # ------------------------------------------------------------------ time
    def poll(self, now: float) -> None:
        self._advance(now)
        self._try_form(now)

    def next_deadline(self) -> Optional[float]:
        """The earliest time at which ``poll`` may change something."""
        while self._leases:  # drop heap entries of renewed or removed members
            seen, pid = self._leases[0]
            m = self.members.get(pid)
            if m is not None and m.last_seen == seen:
                break
            heapq.heappop(self._leases)
        times = [self._leases[0][0] + self.params.lease_timeout] if self._leases else []
        if self.voting is not None:
            times.append(self.voting.deadline)
        if self.syncs and self.first_sync_at is not None and not self.grace_spent:
            healers = {pid for pid, r in self.healing.items() if r == self.committed_round and pid in self.members}
            times.append(self._wait_until(self.first_sync_at, healers, set(self.syncs)))
        return min(times) if times else None

    # ------------------------------------------------------------------ status
    @property
    def phase(self) -> str:
        return "voting" if self.voting is not None else "collecting"

    def status(self, now: float) -> dict:
        return {
            "committed_round": self.committed_round,
            "quorum_id": self.quorum_id,
            "phase": self.phase,
            "schema_hash": self.schema_hash,
            "min_peers": self.params.min_peers,
            "members": [
                {
                    "peer_id": m.peer_id,
                    "address": m.address,
                    "region": m.region,
                    "world_size": m.world_size,
                    "round": m.round,
                    "state": m.state.value,
                    "state_hash": m.state_hash,
                    "lease_age": max(0.0, now - m.last_seen),
                    "contribution": m.contribution,
                }
                for m in sorted(self.members.values(), key=lambda m: m.peer_id)
            ],
            "commits": [_record_dict(r) for r in self.history[-20:]],
        }
