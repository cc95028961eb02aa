"""The Coordinator gRPC service: the quorum state machine behind an asyncio server.

All calls run on one event loop, so the state machine needs no locks. After
every state change the durable snapshot is written (atomically) BEFORE any
answer that depends on it is released. Sync and Commit calls are held until
their answer exists or ``wait_ms`` (capped by ``max_wait_s``) passes, in which
case they answer WAIT and the peer calls again; a held call waits on its own
future, woken only when the state machine posts an answer for that peer, so
heartbeats and other peers' calls cost the waiting calls nothing. A timer
task sleeps until the state machine's next deadline (lease expiry, the grace
window, a commit deadline). Every membership change, quorum, commit and retry
goes to the state dir's ``events.jsonl`` and to the log as one JSON line.

Identity. Every RPC first asks the :class:`~dtrain.wire.auth.IdentityGuard`
(rules in :mod:`dtrain.wire.auth`): Join, Heartbeat, Leave, Sync, Commit and
Report must come from the identity of the ``peer_id`` they name (under mutual
TLS or identity tokens), Status from any authenticated caller; a revoked peer
is refused everywhere. A refused call is PERMISSION_DENIED, one log line, and
touches nothing. :meth:`CoordinatorService.revoke` installs a new revocation
list and removes the revoked members at once (the next quorum forms without
them; one in the quorum being voted on makes the round retry without it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Dict, FrozenSet, List, Optional, ParamSpec, Tuple, TypeVar

import grpc

from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import IdentityGuard
from ..wire.outcomes import (
    CommitDecision,
    SyncOutcome,
    commit_decision_to_proto,
    sync_outcome_to_proto,
)
from .quorum import CommitAnswer, Donor, QuorumMachine, Refusal, SyncAnswer
from .state_store import StateStore
from .work_plan import WorkPlan

log = logging.getLogger("dtrain.control")

P = ParamSpec("P")
T = TypeVar("T")


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _work_plan(req: pb.JoinRequest) -> WorkPlan:
    """The round plan a joiner declares; a peer that sends none (older clients, tools) gets H = 1, fixed."""
    if not req.HasField("plan") or req.plan.sync_every < 1:
        return WorkPlan()
    p = req.plan
    try:
        return WorkPlan(p.sync_every, p.min_steps, p.balanced, p.tolerance)
    except ValueError as e:
        raise Refusal("INVALID_ARGUMENT", str(e)) from None


def _donor_pb(d: Donor) -> pb.Donor:
    return pb.Donor(peer_id=d.peer_id, address=d.address, round=d.round, state_hash=d.state_hash)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        machine: QuorumMachine,
        store: Optional[StateStore],
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        store_address: str = "",
        guard: Optional[IdentityGuard] = None,
    ):
        self.machine, self.store, self.max_wait_s, self.clock = machine, store, max_wait_s, clock
        self.guard = guard if guard is not None else IdentityGuard(logger=log)  # default: nothing bound
        self._waiters: Dict[str, asyncio.Future] = {}  # peer -> the future its held call awaits
        self._wake_timer = asyncio.Event()
        self._timer_target: Optional[float] = None
        self._timer: Optional[asyncio.Task] = None
        self._quorum_pb: Optional[Tuple[int, int, pb.Quorum]] = None  # built once per quorum
        self.store_address = store_address  # a TCPStore for gloo collectives, when served

    # ------------------------------------------------------------------ plumbing
    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            try:
                await self._timer
            except asyncio.CancelledError:
                pass

    def _after(self) -> None:
        """Persist (before any answer leaves), log events, wake the calls that got answers."""
        if self.machine.dirty:
            if self.store is not None:
                self.store.save(self.machine.snapshot())
            self.machine.dirty = False
        for ev in self.machine.drain_events():
            rec = self.store.append_event(ev) if self.store is not None else ev
            log.info(json.dumps(rec))
        for pid in self.machine.drain_posted():
            fut = self._waiters.get(pid)
            if fut is not None:
                _wake(fut)
        nxt = self.machine.next_deadline()
        if nxt is not None and (self._timer_target is None or nxt < self._timer_target):
            self._wake_timer.set()

    async def _call(
        self, context: grpc.aio.ServicerContext, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        try:
            return fn(*args, **kwargs)
        except Refusal as r:
            log.info(json.dumps({"event": "refused", "code": r.code, "reason": r.message}))
            await context.abort(getattr(grpc.StatusCode, r.code), r.message)
        finally:
            self._after()

    async def _bind(self, context: grpc.aio.ServicerContext, method: str, claimed: Optional[str]) -> None:
        """PERMISSION_DENIED (and one log line, by the guard) unless the caller may make this call
        as peer ``claimed`` (None: a call that names no peer)."""
        _, why = self.guard.authorize(context, method, claimed)
        if why:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def revoke(self, revoked: FrozenSet[str]) -> List[str]:
        """Install a new revocation list; removes the revoked members now. Returns the ids removed."""
        self.guard.revoked = frozenset(revoked)
        now, gone = self.clock(), []
        for pid in sorted(revoked):
            m = self.machine.members.get(pid)
            if m is not None:
                self.machine.leave(pid, m.incarnation, now=now, reason="revoked")
                gone.append(pid)
        self._after()
        return gone

    async def _wait_for(self, peer_id: str, take: Callable[[], Optional[T]], wait_ms: int) -> Optional[T]:
        timeout = min(self.max_wait_s, wait_ms / 1000.0)  # wait_ms=0: answer at once
        deadline = self.clock() + timeout
        while True:
            ans = take()
            if ans is not None:
                return ans
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._waiters[peer_id] = fut
            timer = loop.call_later(remaining, _wake, fut)
            try:
                await fut
            finally:
                timer.cancel()
                if self._waiters.get(peer_id) is fut:
                    del self._waiters[peer_id]
            if peer_id not in self.machine.members:  # removed meanwhile: answer now, the peer re-joins
                return take()

    async def _tick_forever(self) -> None:
        while True:
            nxt = self.machine.next_deadline()
            self._timer_target = nxt
            delay = 1.0 if nxt is None else min(1.0, max(0.0, nxt - self.clock()) + 0.001)
            try:
                await asyncio.wait_for(self._wake_timer.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake_timer.clear()
            try:
                self.machine.poll(self.clock())
                self._after()
            except Exception:  # never let the timer die: leases and deadlines depend on it
                log.exception("coordinator timer: poll failed")

    # ------------------------------------------------------------------ membership
    async def Join(self, req: pb.JoinRequest, context) -> pb.JoinReply:
        await self._bind(context, "Join", req.peer_id)
        r = await self._call(
            context,
            lambda: self.machine.join(
                req.peer_id,
                req.incarnation,
                req.address,
                req.schema_hash,
                req.world_size,
                req.region,
                req.round,
                req.state_hash,
                now=self.clock(),
                plan=_work_plan(req),
                slice=req.slice,
            ),
        )
        p = self.machine.params
        reply = pb.JoinReply(
            lease_timeout_ms=int(p.lease_timeout * 1000),
            heartbeat_interval_ms=int(p.heartbeat_interval * 1000),
            committed_round=r.committed_round,
            committed_state_hash=r.committed_state_hash,
            must_heal=r.must_heal,
            quorum_id=r.quorum_id,
            min_peers=p.min_peers,
        )
        if r.donor is not None:
            reply.donor.CopyFrom(_donor_pb(r.donor))
        return reply

    async def Heartbeat(self, req: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        await self._bind(context, "Heartbeat", req.peer_id)
        rnd, qid = await self._call(context, self.machine.heartbeat, req.peer_id, req.incarnation, now=self.clock())
        return pb.HeartbeatReply(
            committed_round=rnd, quorum_id=qid, lease_timeout_ms=int(self.machine.params.lease_timeout * 1000)
        )

    async def Leave(self, req: pb.LeaveRequest, context) -> pb.LeaveReply:
        await self._bind(context, "Leave", req.peer_id)
        await self._call(context, self.machine.leave, req.peer_id, req.incarnation, now=self.clock(), reason=req.reason)
        return pb.LeaveReply()

    # ------------------------------------------------------------------ rounds
    def _sync_reply(self, a: Optional[SyncAnswer]) -> pb.SyncReply:
        if a is None:
            return pb.SyncReply(
                outcome=sync_outcome_to_proto(SyncOutcome.WAIT),
                reason="no quorum yet",
                committed_round=self.machine.committed_round,
            )
        reply = pb.SyncReply(
            outcome=sync_outcome_to_proto(a.outcome), reason=a.reason, committed_round=self.machine.committed_round
        )
        if a.quorum is not None:
            reply.quorum.CopyFrom(self._quorum_message(a.quorum))
        if a.donor is not None:
            reply.donor.CopyFrom(_donor_pb(a.donor))
        if a.next_steps is not None:
            reply.next_steps = a.next_steps
        return reply

    def _quorum_message(self, q) -> pb.Quorum:
        cached = self._quorum_pb
        if cached is None or cached[:2] != (q.quorum_id, q.round):
            msg = pb.Quorum(
                quorum_id=q.quorum_id,
                round=q.round,
                state_hash=q.state_hash,
                commit_timeout_ms=int(q.commit_timeout * 1000),
                store_address=self.store_address,
                members=[
                    pb.Member(
                        peer_id=i,
                        address=a,
                        world_size=w,
                        region=g,
                        steps=work[0],
                        samples=work[1],
                        next_steps=work[2],
                        step_rate=work[3],
                        slice=piece,
                    )
                    for (i, a, w, g), work, piece in zip(
                        q.members, q.work or [(0, 0, 0, 0.0)] * len(q.members), q.slices or [""] * len(q.members)
                    )
                ],
            )
            self._quorum_pb = cached = (q.quorum_id, q.round, msg)
        return cached[2]

    async def Sync(self, req: pb.SyncRequest, context) -> pb.SyncReply:
        await self._bind(context, "Sync", req.peer_id)
        ans = await self._call(
            context,
            self.machine.sync,
            req.peer_id,
            req.incarnation,
            req.round,
            req.state_hash,
            now=self.clock(),
            step_rate=req.step_rate,
            steps=req.steps,
            samples=req.samples,
        )
        if ans is None:
            ans = await self._wait_for(
                req.peer_id, lambda: self.machine.take_sync_answer(req.peer_id, req.round), req.wait_ms
            )
        return self._sync_reply(ans)

    def _commit_reply(self, a: Optional[CommitAnswer], req: pb.CommitRequest) -> pb.CommitReply:
        if a is None:
            return pb.CommitReply(
                decision=commit_decision_to_proto(CommitDecision.WAIT),
                round=req.round,
                quorum_id=req.quorum_id,
                committed_round=self.machine.committed_round,
                reason="votes still missing",
            )
        return pb.CommitReply(
            decision=commit_decision_to_proto(a.decision),
            round=a.round,
            quorum_id=a.quorum_id,
            committed_round=self.machine.committed_round,
            reason=a.reason,
        )

    async def Commit(self, req: pb.CommitRequest, context) -> pb.CommitReply:
        await self._bind(context, "Commit", req.peer_id)
        ans = await self._call(
            context,
            self.machine.commit,
            req.peer_id,
            req.incarnation,
            req.round,
            req.quorum_id,
            req.ok,
            now=self.clock(),
            reason=req.reason,
            contributions={c.peer_id: (c.norm, c.clip) for c in req.contributions},
        )
        if ans is None:
            ans = await self._wait_for(
                req.peer_id, lambda: self.machine.take_commit_answer(req.peer_id, req.round, req.quorum_id), req.wait_ms
            )
        return self._commit_reply(ans, req)

    async def Report(self, req: pb.ReportRequest, context) -> pb.ReportReply:
        await self._bind(context, "Report", req.peer_id)
        excluded = await self._call(
            context,
            self.machine.report,
            req.peer_id,
            req.incarnation,
            req.round,
            req.quorum_id,
            req.culprit,
            req.reason,
            now=self.clock(),
            evidence=req.evidence,
        )
        return pb.ReportReply(excluded=excluded)

    # ------------------------------------------------------------------ status
    async def Status(self, req: pb.StatusRequest, context) -> pb.StatusReply:
        await self._bind(context, "Status", None)
        s = self.machine.status(self.clock())
        return pb.StatusReply(
            committed_round=s["committed_round"],
            quorum_id=s["quorum_id"],
            schema_hash=s["schema_hash"],
            min_peers=s["min_peers"],
            phase=s["phase"],
            lease_timeout_ms=int(self.machine.params.lease_timeout * 1000),
            members=[
                pb.MemberStatus(
                    peer_id=m["peer_id"],
                    address=m["address"],
                    region=m["region"],
                    world_size=m["world_size"],
                    round=m["round"],
                    lease_age_ms=int(m["lease_age"] * 1000),
                    state=m["state"],
                    state_hash=m["state_hash"],
                    **_contribution_fields(m["contribution"]),
                )
                for m in s["members"]
            ],
            commits=[
                pb.CommitRecord(
                    round=c["round"],
                    quorum_id=c["quorum_id"],
                    members=c["members"],
                    state_hash=c["state_hash"],
                    unix_ms=int(c["time"] * 1000),
                )
                for c in s["commits"]
            ],
        )


def _contribution_fields(c) -> dict:
    """A member's last contribution (round, norm, clip) as MemberStatus fields; none yet: nothing."""
    if c is None:
        return {}
    return {"has_contribution": True, "contribution_round": c[0], "contribution_norm": c[1], "clip": c[2]}
