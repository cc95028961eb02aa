"""One outer round as the peer leader sees it: sync, exchange, prepare, commit; retry or heal.

    exchange(payload, prepare):
      loop:
        Sync(r, H(S_r))          -> QUORUM (members, quorum id) | HEAL (donor)
        HEAL:   fetch S from the donor, check its hash, adopt it          -> HEAL
        QUORUM: mean = allreduce_mean(payload) over the members (deadline)
                a member that sent garbage is reported with evidence (excluded once confirmed)
                next = prepare(r, qid, mean): S_{r+1}, computed once (and, with durable
                       commit, persisted) before the vote; an OSError votes not ok, and so
                       does VoteNotOk (prepare refuses S_{r+1}, e.g. the model-free peer's
                       --fail-commit-at)
                Commit(r, qid, ok)
                  COMMIT -> the caller installs ``next``: S_r -> S_{r+1}    -> COMMIT
                  RETRY  -> keep the payload, Sync round r again

Nothing is applied unless every quorum member voted ok in time, so a failed
or partial collective never changes the global state. The payload (the
pseudo-gradient, error feedback already folded in) is kept across retries.
The engine adopts a donor's state itself (a heal changes S in place and
publishes it); a commit only returns ``next`` for the caller to install.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..comm.collective import Collective, CollectiveError, CollectiveResult, Group
from ..comm.state_download import StateTransferError, fetch_state
from ..control.client import CoordinatorClient, HealOrder, QuorumView, SyncReport
from ..outer.global_state import GlobalState, StateError
from ..outer.weighting import integer_weights
from ..wire.outcomes import CommitDecision, RoundOutcome

log = logging.getLogger("dtrain.outer")

# prepare(round, quorum_id, mean, covered) -> S_{round+1}; called after a good collective, before the vote
# (covered: the coordinates some member trained, when members cover different slices; None: all)
Prepare = Callable[[int, int, torch.Tensor, Optional[torch.Tensor]], Optional[GlobalState]]


class VoteNotOk(Exception):
    """Raised by ``prepare``: this peer will not take S_{r+1}; it votes not ok, the message is the reason."""


@dataclass
class HealInfo:
    donor: str
    bytes: int
    seconds: float
    reason: str


@dataclass
class ExchangeResult:
    outcome: RoundOutcome  # COMMIT or HEAL
    round: int  # COMMIT: the round committed; HEAL: the round of the adopted state
    quorum_id: int = 0
    members: List[str] = field(default_factory=list)
    mean: Optional[torch.Tensor] = None
    next_state: Optional[GlobalState] = None  # COMMIT: what prepare returned for the committed quorum
    bytes_sent: int = 0
    bytes_recv: int = 0
    comm_s: float = 0.0
    wait_s: float = 0.0
    attempts: int = 0
    heal: Optional[HealInfo] = None
    # COMMIT, per member of the committed quorum: the inner steps it trained in this round, and those
    # assigned to it for the next round (0: it sits the next round out)
    steps: Dict[str, int] = field(default_factory=dict)
    next_steps: Dict[str, int] = field(default_factory=dict)
    weights: Tuple[int, ...] = ()  # the members' weights in the mean, ring order (empty: equal)
    rates: Dict[str, float] = field(default_factory=dict)  # COMMIT: each member's reported step rate


class RoundEngine:
    def __init__(
        self,
        client: CoordinatorClient,
        collective: Optional[Collective],
        state: GlobalState,
        publish: Callable[[], None],
        peer_id: str,
        schema_hash: str,
        token: str = "",
        tls=None,
        deadline_s: float = 30.0,
        sync_timeout_s: float = 600.0,
        transfer_timeout_s: float = 120.0,
        weighting: str = "uniform",
        slices: Optional[Callable[[str], Optional[torch.Tensor]]] = None,
    ):
        self.client, self.collective, self.state = client, collective, state
        # capacity-aware peers: a member's announced slice spec -> its flat mask (None: it covers everything)
        self.slices = slices
        self.publish = publish  # serve the current state to joiners (after a heal)
        self.peer_id, self.schema_hash, self.token, self.tls = peer_id, schema_hash, token, tls
        self.deadline_s, self.sync_timeout_s, self.transfer_timeout_s = deadline_s, sync_timeout_s, transfer_timeout_s
        self.weighting = weighting  # samples | uniform (dtrain.outer.weighting)

    def exchange(
        self,
        payload: torch.Tensor,
        op: str = "all",
        prepare: Optional[Prepare] = None,
        report: Optional[SyncReport] = None,
    ) -> ExchangeResult:
        """One round; ``report`` (this member's rate and work in the round) goes with every Sync."""
        out = ExchangeResult(RoundOutcome.COMMIT, self.state.round)
        report = report or SyncReport()
        while True:
            out.attempts += 1
            t0 = time.perf_counter()
            ans = self.client.sync(self.state.round, self.state.hash(), timeout=self.sync_timeout_s, report=report)
            out.wait_s += time.perf_counter() - t0
            if isinstance(ans, HealOrder):
                if self._heal_into(ans, out):
                    return out
                continue
            weights = self._weights(ans)
            group = Group(
                ans.quorum_id,
                ans.round,
                tuple((m[0], m[1]) for m in ans.members),
                self.peer_id,
                op,
                ans.store_address,
                weights,
                self._masks(ans),
            )
            t1 = time.perf_counter()
            ok, reason = True, ""
            result: Optional[CollectiveResult] = None
            try:
                assert self.collective is not None, "the round engine has no collective"
                result = self.collective.allreduce_mean(payload, group, self.deadline_s)
                out.bytes_sent += result.bytes_sent
                out.bytes_recv += result.bytes_recv
            except CollectiveError as e:
                ok, reason = False, str(e)[:200]
                log.warning("round %d quorum %d: collective failed: %s", ans.round, ans.quorum_id, e)
                if e.culprit and e.culprit != self.peer_id:
                    excluded = self.client.report(ans.round, ans.quorum_id, e.culprit, reason, evidence=e.evidence)
                    log.warning(
                        "reported %s to the coordinator, evidence %s (excluded: %s)",
                        e.culprit,
                        e.evidence[:16] or "none",
                        excluded,
                    )
            out.comm_s += time.perf_counter() - t1
            nxt: Optional[GlobalState] = None
            if result is not None and prepare is not None:
                try:
                    nxt = prepare(ans.round, ans.quorum_id, result.tensor, getattr(result, "covered", None))
                except OSError as e:
                    ok, reason = False, f"cannot persist the next state: {e}"[:200]
                    log.error("round %d: %s", ans.round, reason)
                except VoteNotOk as e:
                    ok, reason = False, str(e)[:200]
                    log.warning("round %d quorum %d: voting not ok: %s", ans.round, ans.quorum_id, reason)
            t2 = time.perf_counter()
            decision = self.client.commit(
                ans.round,
                ans.quorum_id,
                ok,
                reason,
                timeout=self.sync_timeout_s,
                contributions=getattr(result, "contributions", None),
            )
            out.wait_s += time.perf_counter() - t2
            if decision is CommitDecision.COMMIT and ok and result is not None:
                out.quorum_id, out.members, out.mean = ans.quorum_id, list(ans.ids), result.tensor
                out.round, out.next_state, out.weights = ans.round, nxt, weights
                out.steps = {pid: w.steps for pid, w in zip(ans.ids, ans.work)}
                out.next_steps = {pid: w.next_steps for pid, w in zip(ans.ids, ans.work)}
                out.rates = {pid: w.step_rate for pid, w in zip(ans.ids, ans.work)}
                return out
            log.info("round %d quorum %d: retry", ans.round, ans.quorum_id)

    def _weights(self, quorum: QuorumView) -> Tuple[int, ...]:
        """The members' weights from the samples each reported (all equal when none did)."""
        weights = integer_weights([w.samples for w in quorum.work], self.weighting) if quorum.work else ()
        return weights if sum(weights) > 0 and len(set(weights)) > 1 else ()

    def _masks(self, quorum: QuorumView) -> tuple:
        """The members' flat masks (None: a member covering everything); empty when nobody is capped."""
        if self.slices is None or not any(quorum.slices):
            return ()
        return tuple(self.slices(spec) for spec in quorum.slices)

    def heal(self, order: HealOrder) -> Optional[ExchangeResult]:
        """Adopt the state of ``order``'s donor; the HEAL result, or None when the download failed."""
        out = ExchangeResult(RoundOutcome.HEAL, self.state.round)
        return out if self._heal_into(order, out) else None

    def _heal_into(self, order: HealOrder, out: ExchangeResult) -> bool:
        donor = order.donor
        t0 = time.perf_counter()
        try:
            snap = fetch_state(
                donor.address,
                self.schema_hash,
                min_round=donor.round,
                token=self.token,
                tls=self.tls,
                timeout=self.transfer_timeout_s,
                requester=self.peer_id,
            )
            if donor.state_hash and snap.round == donor.round and snap.state_hash != donor.state_hash:
                raise StateError(
                    f"the donor's state hashes to {snap.state_hash[:12]}..., the coordinator "
                    f"knows S_{donor.round} as {donor.state_hash[:12]}..."
                )
            self.state.adopt(snap)
        except (StateTransferError, StateError) as e:
            log.warning("heal from %s at %s failed: %s", donor.peer_id, donor.address, e)
            return False
        seconds = time.perf_counter() - t0
        self.publish()
        out.outcome, out.round = RoundOutcome.HEAL, self.state.round
        out.heal = HealInfo(donor.peer_id, len(snap.payload), seconds, order.reason)
        if order.next_steps is not None:
            out.next_steps = {self.peer_id: order.next_steps}
        log.info(
            "healed to round %d from %s (%d bytes in %.2fs): %s",
            self.state.round,
            donor.peer_id,
            len(snap.payload),
            seconds,
            order.reason,
        )
        return True
