"""The peer side of the control plane: a blocking client for the coordinator.

- ``join`` retries with exponential backoff (and jitter) while the coordinator
  is unreachable or the peer id is still held by this peer's previous
  incarnation; every other refusal raises a :class:`ControlError` subclass
  that says what is wrong.
- A background thread renews the lease (``start_heartbeat``) whenever no
  other call has done so within the heartbeat interval. When the
  coordinator has forgotten the peer (restart, expired lease) it re-joins on
  its own, reporting the state the peer holds through ``state_fn``.
- ``sync`` and ``commit`` have deadlines, call again while the coordinator
  answers WAIT, ride out coordinator restarts (UNAVAILABLE -> backoff,
  PERMISSION_DENIED -> re-join), and return what the peer must do.
- ``leave`` is best effort and quick: a peer shutting down calls it so the
  next quorum forms without waiting for its lease.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import grpc

from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import auth_metadata, make_channel
from ..wire.outcomes import (
    CommitDecision,
    SyncOutcome,
    UnknownOutcome,
    commit_decision_from_proto,
    sync_outcome_from_proto,
)
from .work_plan import WorkPlan

log = logging.getLogger("dtrain.control")

R = TypeVar("R")  # the reply message type of one RPC


# ---------------------------------------------------------------- errors


class ControlError(RuntimeError):
    """A refusal by the coordinator (or a peer); ``code`` is the gRPC status code."""

    code = grpc.StatusCode.UNKNOWN
    hint = ""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message + (f" ({self.hint})" if self.hint else ""))
        self.detail = message  # without the hint, for re-wrapping
        if code is not None:
            self.code = code


class SchemaMismatch(ControlError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    hint = "every peer of a run must use the same dtrain version and model config"


class DuplicatePeer(ControlError):
    code = grpc.StatusCode.ALREADY_EXISTS
    hint = "give each peer its own peer_id"


class StaleRound(ControlError):
    code = grpc.StatusCode.ABORTED


class NotAuthenticated(ControlError):
    code = grpc.StatusCode.UNAUTHENTICATED
    hint = "set auth.token or DTRAIN_TOKEN to the run's token"


class NotMember(ControlError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AheadOfCoordinator(ControlError):
    code = grpc.StatusCode.OUT_OF_RANGE
    hint = "start the coordinator on the run's state_dir"


class MessageTooLarge(ControlError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InvalidRequest(ControlError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Stopping(ControlError):
    """The peer is shutting down (SIGTERM / SIGINT) while waiting for a quorum: the round is abandoned."""


class CoordinatorUnavailable(ControlError):
    code = grpc.StatusCode.UNAVAILABLE
    hint = "is the coordinator running, and is the address right?"


_BY_CODE = {
    c.code: c
    for c in (
        SchemaMismatch,
        DuplicatePeer,
        StaleRound,
        NotAuthenticated,
        NotMember,
        AheadOfCoordinator,
        MessageTooLarge,
        InvalidRequest,
        CoordinatorUnavailable,
    )
}
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def to_control_error(err: grpc.RpcError) -> ControlError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, ControlError)
    return cls(f"{code.name}: {err.details() if hasattr(err, 'details') else err}", code)


# ---------------------------------------------------------------- answers


@dataclass(frozen=True)
class DonorInfo:
    peer_id: str
    address: str
    round: int
    state_hash: str


@dataclass(frozen=True)
class JoinInfo:
    committed_round: int
    committed_state_hash: str
    must_heal: bool
    donor: Optional[DonorInfo]
    quorum_id: int
    lease_timeout: float
    heartbeat_interval: float
    min_peers: int


@dataclass(frozen=True)
class QuorumView:
    quorum_id: int
    round: int
    members: Tuple[Tuple[str, str, int, str], ...]  # (peer_id, address, world_size, region), ring order
    state_hash: str
    commit_timeout: float
    store_address: str = ""  # TCPStore for gloo collectives, when the coordinator serves one
    work: Tuple[MemberWork, ...] = ()  # per member, ring order
    slices: Tuple[str, ...] = ()  # per member, ring order: the top arch it trains within ("": everything)

    @property
    def ids(self) -> List[str]:
        return [m[0] for m in self.members]


@dataclass(frozen=True)
class MemberWork:
    """A quorum member's work: what it trained in this round and what it is assigned for the next."""

    steps: int
    samples: int
    next_steps: int
    step_rate: float


@dataclass(frozen=True)
class SyncReport:
    """What a member tells the coordinator with a Sync: its measured rate and the work of this round."""

    step_rate: float = 0.0  # inner steps per second; 0: not measured yet
    steps: int = 0
    samples: int = 0


@dataclass(frozen=True)
class HealOrder:
    donor: DonorInfo
    committed_round: int
    reason: str
    next_steps: Optional[int] = None  # balanced rounds: the steps assigned for the round it enters


def _sync_outcome(reply: pb.SyncReply) -> SyncOutcome:
    try:
        return sync_outcome_from_proto(reply.outcome)
    except UnknownOutcome as e:
        raise ControlError(f"the coordinator sent {e}") from None


def _decision(reply: pb.CommitReply) -> CommitDecision:
    try:
        return commit_decision_from_proto(reply.decision)
    except UnknownOutcome as e:
        raise ControlError(f"the coordinator sent {e}") from None


def _plan_pb(plan: Optional[WorkPlan]) -> Optional[pb.WorkPlan]:
    if plan is None:
        return None
    return pb.WorkPlan(
        sync_every=plan.sync_every, min_steps=plan.min_steps, balanced=plan.balanced, tolerance=plan.tolerance
    )


def _donor(d: pb.Donor) -> Optional[DonorInfo]:
    if not d.peer_id:
        return None
    return DonorInfo(d.peer_id, d.address, d.round, d.state_hash)


class Backoff:
    """Exponential backoff with full jitter: sleep U(0, min(cap, base * 2^n))."""

    def __init__(self, base: float = 0.05, cap: float = 2.0):
        self.base, self.cap, self.attempts = base, cap, 0

    def sleep(self, until: Optional[float] = None) -> None:
        delay = random.uniform(0, min(self.cap, self.base * (2**self.attempts)))
        self.attempts += 1
        if until is not None:
            delay = max(0.0, min(delay, until - time.monotonic()))
        time.sleep(delay)

    def reset(self) -> None:
        self.attempts = 0


# ---------------------------------------------------------------- the client


class CoordinatorClient:
    def __init__(
        self,
        target: str,
        peer_id: str,
        address: str,
        schema_hash: str,
        world_size: int = 1,
        region: str = "",
        token: str = "",
        tls=None,
        rpc_timeout: float = 10.0,
        max_message_bytes: int = 4 * 2**20,
        state_fn: Optional[Callable[[], Tuple[int, str]]] = None,
        plan: Optional[WorkPlan] = None,
        slice: str = "",
    ):
        self.target, self.peer_id, self.address = target, peer_id, address
        self.schema_hash, self.world_size, self.region = schema_hash, world_size, region
        self.rpc_timeout = rpc_timeout
        self.state_fn = state_fn or (lambda: (0, ""))
        self.plan = plan  # the round plan declared at join (None: the coordinator's default, H = 1 fixed)
        self.slice = slice  # capacity: the top arch this peer trains within, canonical JSON ("": everything)
        self.incarnation = uuid.uuid4().hex
        self.should_stop: Optional[Callable[[], bool]] = None  # True: stop waiting for a quorum (Stopping)
        self._md = auth_metadata(token)
        self._channel = make_channel(target, tls, max_message_bytes)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._left = False  # after leave(): never re-join behind the caller's back
        self._hb: Optional[threading.Thread] = None
        self.joined: Optional[JoinInfo] = None
        self.rejoins = 0  # automatic re-joins (coordinator restarts, expired leases)
        self.last_heartbeat: Optional[float] = None
        self._last_call = 0.0  # start of the latest call: every call renews the lease

    # -- low level ----------------------------------------------------------------------
    def _rpc(self, method: str, request, timeout: Optional[float] = None):
        fn = getattr(self._stub, method)
        self._last_call = time.monotonic()
        try:
            return fn(request, timeout=timeout or self.rpc_timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise to_control_error(e) from None

    # -- membership -----------------------------------------------------------------------
    def join(self, timeout: float = 60.0) -> JoinInfo:
        """Join (or re-join) the run; retries transient failures until ``timeout``."""
        deadline = time.monotonic() + timeout
        backoff = Backoff()
        while True:
            rnd, h = self.state_fn()
            req = pb.JoinRequest(
                peer_id=self.peer_id,
                address=self.address,
                schema_hash=self.schema_hash,
                world_size=self.world_size,
                region=self.region,
                incarnation=self.incarnation,
                round=rnd,
                state_hash=h,
                plan=_plan_pb(self.plan),
                slice=self.slice,
            )
            try:
                r = self._rpc("Join", req)
            except (CoordinatorUnavailable, DuplicatePeer) as e:
                if time.monotonic() >= deadline:
                    raise type(e)(
                        f"join of {self.peer_id!r} at {self.target} gave up after {timeout:g}s: {e.detail}", e.code
                    ) from None
                log.debug("join retry: %s", e)
                backoff.sleep(deadline)
                continue
            except ControlError as e:
                if e.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < deadline:
                    backoff.sleep(deadline)
                    continue
                raise
            info = JoinInfo(
                r.committed_round,
                r.committed_state_hash,
                r.must_heal,
                _donor(r.donor),
                r.quorum_id,
                r.lease_timeout_ms / 1000.0,
                r.heartbeat_interval_ms / 1000.0,
                r.min_peers,
            )
            with self._lock:
                self.joined = info
            return info

    def _rejoin(self, why: str) -> None:
        if self._left:
            raise NotMember(f"{self.peer_id!r} has left the run ({why})")
        log.info("re-joining the coordinator (%s)", why)
        self.join()
        self.rejoins += 1

    def start_heartbeat(self) -> None:
        if self._hb is not None:
            return
        self._hb = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.peer_id}", daemon=True)
        self._hb.start()

    def _heartbeat_loop(self) -> None:
        backoff = Backoff(0.05, 1.0)
        while not self._stop.is_set():
            interval = self.joined.heartbeat_interval if self.joined else 1.0
            quiet = time.monotonic() - self._last_call
            if quiet < interval:  # another call renewed the lease recently: no heartbeat needed yet
                self._stop.wait(interval - quiet)
                continue
            try:
                self._rpc(
                    "Heartbeat",
                    pb.HeartbeatRequest(peer_id=self.peer_id, incarnation=self.incarnation),
                    timeout=max(interval, 1.0),
                )
                self.last_heartbeat = time.monotonic()
                backoff.reset()
            except NotMember:
                try:
                    self._rejoin("heartbeat: not a member")
                except ControlError as e:
                    log.warning("re-join failed: %s", e)
            except ControlError as e:
                log.debug("heartbeat failed: %s", e)
                backoff.sleep()
                continue
            self._stop.wait(interval)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._hb is not None and self._hb is not threading.current_thread():
            self._hb.join(timeout=5.0)

    def leave(self, reason: str = "") -> None:
        """Leave the run (best effort, a few seconds at most); no automatic re-join afterwards."""
        self._left = True
        self.stop_heartbeat()
        try:
            self._rpc(
                "Leave",
                pb.LeaveRequest(peer_id=self.peer_id, incarnation=self.incarnation, reason=reason),
                timeout=min(self.rpc_timeout, 3.0),
            )
        except ControlError as e:
            log.warning("leave failed (the lease will expire instead): %s", e)

    def close(self) -> None:
        self.stop_heartbeat()
        self._channel.close()

    # -- rounds ---------------------------------------------------------------------------
    def _retrying(
        self, method: str, make_request: Callable[[int], object], timeout: Optional[float], done: Callable[[R], bool]
    ) -> R:
        """Call ``method`` until ``done(reply)``; rides out restarts and re-joins."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff()
        while True:
            if method == "Sync" and self.should_stop is not None and self.should_stop():
                raise Stopping(f"{self.peer_id!r} is stopping: abandoned the wait for a quorum")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0.005:
                raise TimeoutError(f"{method} of {self.peer_id!r} got no final answer within {timeout:g}s")
            wait_ms = max(1, int(min(5.0, left if left is not None else 5.0) * 1000))
            try:
                reply = self._rpc(method, make_request(wait_ms), timeout=wait_ms / 1000.0 + self.rpc_timeout)
            except CoordinatorUnavailable as e:
                log.debug("%s: %s", method, e)
                backoff.sleep(deadline)
                continue
            except NotMember:
                self._rejoin(f"{method}: not a member")
                continue
            except ControlError as e:
                if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                raise
            backoff.reset()
            if done(reply):
                return reply

    def sync(self, round: int, state_hash: str, timeout: Optional[float] = None, report: Optional[SyncReport] = None):
        """Report that this peer holds S_round (and its work in the round); returns a QuorumView or a
        HealOrder."""
        report = report or SyncReport()

        def req(wait_ms):
            return pb.SyncRequest(
                peer_id=self.peer_id,
                incarnation=self.incarnation,
                round=round,
                state_hash=state_hash,
                wait_ms=wait_ms,
                step_rate=report.step_rate,
                steps=report.steps,
                samples=report.samples,
            )

        r: pb.SyncReply = self._retrying("Sync", req, timeout, lambda r: _sync_outcome(r) is not SyncOutcome.WAIT)
        if _sync_outcome(r) is SyncOutcome.HEAL:
            donor = _donor(r.donor)
            if donor is None:  # a HEAL without a donor leaves the peer nothing to copy from
                raise ControlError("the coordinator sent HEAL without a donor")
            return HealOrder(donor, r.committed_round, r.reason, r.next_steps if r.HasField("next_steps") else None)
        q = r.quorum
        return QuorumView(
            q.quorum_id,
            q.round,
            tuple((m.peer_id, m.address, m.world_size, m.region) for m in q.members),
            q.state_hash,
            q.commit_timeout_ms / 1000.0,
            q.store_address,
            tuple(MemberWork(m.steps, m.samples, m.next_steps, m.step_rate) for m in q.members),
            tuple(m.slice for m in q.members),
        )

    def commit(
        self,
        round: int,
        quorum_id: int,
        ok: bool,
        reason: str = "",
        timeout: Optional[float] = None,
        contributions: Optional[Dict[str, Tuple[float, float]]] = None,
    ) -> CommitDecision:
        """Vote on round ``round`` of quorum ``quorum_id``: COMMIT or RETRY (a stale vote is a RETRY).
        ``contributions``: what this member saw each member contribute, peer -> (norm, clip factor)."""
        seen = [pb.Contribution(peer_id=p, norm=n, clip=c) for p, (n, c) in sorted((contributions or {}).items())]

        def req(wait_ms):
            return pb.CommitRequest(
                peer_id=self.peer_id,
                incarnation=self.incarnation,
                round=round,
                quorum_id=quorum_id,
                ok=ok,
                reason=reason,
                wait_ms=wait_ms,
                contributions=seen,
            )

        try:
            r: pb.CommitReply = self._retrying(
                "Commit", req, timeout, lambda r: _decision(r) is not CommitDecision.WAIT
            )
        except StaleRound as e:
            log.info("commit of round %d quorum %d is stale: %s", round, quorum_id, e)
            return CommitDecision.RETRY
        return _decision(r)

    def report(self, round: int, quorum_id: int, culprit: str, reason: str, evidence: str = "") -> bool:
        """Accuse a quorum member (garbage, or clipped hard too often) with ``evidence``, the hash of the
        bytes judged bad; True when this report excluded it (a second member confirmed it, or its vote failed)."""
        req = pb.ReportRequest(
            peer_id=self.peer_id,
            incarnation=self.incarnation,
            round=round,
            quorum_id=quorum_id,
            culprit=culprit,
            reason=reason[:200],
            evidence=evidence[:128],
        )
        try:
            return self._rpc("Report", req).excluded
        except ControlError as e:
            log.warning("report of %r failed: %s", culprit, e)
            return False

    def status(self) -> pb.StatusReply:
        return self._rpc("Status", pb.StatusRequest())
