"""One outer round as the peer leader sees it: sync, exchange, commit; retry or heal.

    exchange(payload):
      loop:
        Sync(r, H(S_r))          -> QUORUM (members, quorum id) | HEAL (donor)
        HEAL:   fetch S from the donor, check its hash, adopt it       -> "heal"
        QUORUM: mean = allreduce_mean(payload) over the members (deadline)
                a member that sent garbage is reported (it is excluded)
                prepare(r, qid, mean): the caller may persist S_{r+1} first (durable commit)
                Commit(r, qid, ok)
                  COMMIT -> the caller applies the mean: S_r -> S_{r+1}   -> "commit"
                  RETRY  -> keep the payload, Sync round r again

Nothing is applied unless every quorum member voted ok in time, so a failed
or partial collective never changes the global state. The payload (the
pseudo-gradient, error feedback already folded in) is kept across retries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..comm.collective import Collective, CollectiveError, Group
from ..comm.state_download import StateTransferError, fetch_state
from ..control.client import CoordinatorClient, HealOrder
from ..outer.global_state import GlobalState, StateError

log = logging.getLogger("dtrain.outer")


@dataclass
class RoundOutcome:
    kind: str  # commit | heal
    round: int  # commit: the round committed; heal: the round of the adopted state
    quorum_id: int = 0
    members: List[str] = field(default_factory=list)
    mean: Optional[torch.Tensor] = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    comm_s: float = 0.0
    wait_s: float = 0.0
    attempts: int = 0
    heal: Optional[dict] = None  # {"donor", "bytes", "seconds"}


class RoundEngine:
    def __init__(self, client: CoordinatorClient, collective: Collective, state: GlobalState, publish,
                 peer_id: str, schema_hash: str, token: str = "", tls=None, deadline_s: float = 30.0,
                 sync_timeout_s: float = 600.0, transfer_timeout_s: float = 120.0, prepare=None):
        self.client, self.collective, self.state = client, collective, state
        # prepare(round, quorum_id, mean): called after a good collective, before the vote (durable commit);
        # an exception makes this member vote not ok
        self.prepare = prepare
        self.publish = publish  # publish(state): serve the current state to joiners
        self.peer_id, self.schema_hash, self.token, self.tls = peer_id, schema_hash, token, tls
        self.deadline_s, self.sync_timeout_s, self.transfer_timeout_s = deadline_s, sync_timeout_s, transfer_timeout_s

    def exchange(self, payload: torch.Tensor, op: str = "all") -> RoundOutcome:
        out = RoundOutcome("commit", self.state.round)
        while True:
            out.attempts += 1
            t0 = time.perf_counter()
            ans = self.client.sync(self.state.round, self.state.hash(), timeout=self.sync_timeout_s)
            out.wait_s += time.perf_counter() - t0
            if isinstance(ans, HealOrder):
                if self._heal(ans, out):
                    return out
                continue
            group = Group(ans.quorum_id, ans.round, tuple((m[0], m[1]) for m in ans.members), self.peer_id, op,
                          ans.store_address)
            t1 = time.perf_counter()
            ok, reason, result = True, "", None
            try:
                result = self.collective.allreduce_mean(payload, group, self.deadline_s)
                out.bytes_sent += result.bytes_sent
                out.bytes_recv += result.bytes_recv
            except CollectiveError as e:
                ok, reason = False, str(e)[:200]
                log.warning("round %d quorum %d: collective failed: %s", ans.round, ans.quorum_id, e)
                if e.culprit and e.culprit != self.peer_id:
                    excluded = self.client.report(ans.round, ans.quorum_id, e.culprit, reason)
                    log.warning("reported %s to the coordinator (excluded: %s)", e.culprit, excluded)
            out.comm_s += time.perf_counter() - t1
            if ok and self.prepare is not None:
                try:
                    self.prepare(ans.round, ans.quorum_id, result.tensor)
                except OSError as e:
                    ok, reason = False, f"cannot persist the next state: {e}"[:200]
                    log.error("round %d: %s", ans.round, reason)
            t2 = time.perf_counter()
            committed = self.client.commit(ans.round, ans.quorum_id, ok, reason, timeout=self.sync_timeout_s)
            out.wait_s += time.perf_counter() - t2
            if committed and ok:
                out.quorum_id, out.members, out.mean = ans.quorum_id, list(ans.ids), result.tensor
                out.round = ans.round
                return out
            log.info("round %d quorum %d: retry", ans.round, ans.quorum_id)

    def _heal(self, order: HealOrder, out: RoundOutcome) -> bool:
        donor = order.donor
        t0 = time.perf_counter()
        try:
            snap = fetch_state(donor.address, self.schema_hash, min_round=donor.round, token=self.token,
                               tls=self.tls, timeout=self.transfer_timeout_s)
            self.state.adopt(snap)
        except (StateTransferError, StateError) as e:
            log.warning("heal from %s at %s failed: %s", donor.peer_id, donor.address, e)
            return False
        seconds = time.perf_counter() - t0
        self.publish(self.state)
        out.kind, out.round = "heal", self.state.round
        out.heal = {"donor": donor.peer_id, "bytes": len(snap.payload), "seconds": seconds,
                    "reason": order.reason}
        log.info("healed to round %d from %s (%d bytes in %.2fs): %s", self.state.round, donor.peer_id,
                 len(snap.payload), seconds, order.reason)
        return True
