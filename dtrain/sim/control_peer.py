"""A model-free peer for tests and benchmarks: the full round protocol with a fake, deterministic state.

    python -m dtrain.sim.control_peer --coordinator HOST:PORT --peer-id p1 --rounds 10 --out p1.jsonl

It serves the Peer service (state transfer) on 127.0.0.1:0, joins, renews its
lease, then loops: sleep ``--step-s`` (the inner steps), Sync, and
- HEAL: fetch the state from the donor, adopt its round and bytes, and sync
  again at once (entering the round in progress rather than chasing it);
- QUORUM: (no collective) vote, and on COMMIT apply the "outer step"
  ``payload' = expand(sha256(payload || round), --state-bytes)`` with
  ``expand(d, n) = sha256(d || 0) || sha256(d || 1) || ...`` cut to n bytes
  (rounds as 8-byte big-endian), so every peer holds identical bytes;
  on RETRY: sync the same round again.
The state of round 0 is ``expand(sha256("dtrain-sim-peer\\0" + schema))``; the
state hash is ``sha256(payload)`` (see :mod:`dtrain.wire.snapshot`); the
schema hash covers ``--schema`` and ``--state-bytes``.

``--rounds N`` stops the peer once it holds S_N (N rounds committed in the
run), after a graceful leave. SIGTERM / SIGINT: finish the call in flight,
leave, exit 0. A refusal by the coordinator (wrong schema, duplicate peer id,
bad token ...) is one line on stderr and exit status 1.

``--out`` gets one JSON object per line (flushed): ``start``, ``heal``,
``retry``, ``round`` (``round`` is the round that committed, ``state_hash``
the hash of the state after it, ``state_hash_before`` the one before),
``leave``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from typing import Optional, TextIO

from ..errors import one_line
from ..wire.outcomes import CommitDecision
from ..comm.peer_service import PeerServicer, serve_peer
from ..comm.state_download import StateTransferError, fetch_state
from ..wire.snapshot import DEFAULT_CHUNK_BYTES, StateSnapshot
from ..control.client import ControlError, CoordinatorClient, HealOrder
from ..wire.schema import schema_hash as make_schema_hash

log = logging.getLogger("dtrain.sim_peer")

_ROUND_BYTES = 8


def expand(seed: bytes, n: int) -> bytes:
    """``n`` bytes: sha256(seed || 0) || sha256(seed || 1) || ... (counters 8-byte big-endian)."""
    blocks = (n + 31) // 32
    return b"".join(hashlib.sha256(seed + i.to_bytes(8, "big")).digest() for i in range(blocks))[:n]


def initial_payload(schema: str, n: int) -> bytes:
    return expand(hashlib.sha256(b"dtrain-sim-peer\0" + schema.encode()).digest(), n)


def outer_step(payload: bytes, round: int, n: int) -> bytes:
    """S_{round+1} from S_round: the same bytes on every peer."""
    return expand(hashlib.sha256(payload + round.to_bytes(_ROUND_BYTES, "big")).digest(), n)


def sim_schema_hash(schema: str, state_bytes: int) -> str:
    """Peers of a run must agree on both, so both go into the schema hash."""
    return make_schema_hash({"sim_peer": schema, "state_bytes": state_bytes})


class SimPeer:
    def __init__(self, args: argparse.Namespace, out: TextIO):
        self.a, self.out = args, out
        self.schema_hash = sim_schema_hash(args.schema, args.state_bytes)
        self.stop = threading.Event()
        self.stop_reason = ""
        self._lock = threading.Lock()
        payload = initial_payload(args.schema, args.state_bytes)
        self.snapshot = StateSnapshot(0, payload, meta_json=json.dumps({"schema": args.schema}))
        self.servicer = PeerServicer(self.schema_hash, peer_id=args.peer_id, chunk_bytes=args.chunk_bytes)
        self.servicer.set_snapshot(self.snapshot)
        self.server, port = serve_peer(self.servicer, token=args.token)
        self.address = f"127.0.0.1:{port}"
        self.client = CoordinatorClient(args.coordinator, args.peer_id, self.address, self.schema_hash,
                                        region=args.region, token=args.token, rpc_timeout=args.rpc_timeout,
                                        state_fn=self.state)
        self.failed_commit = False

    # -- state
    def state(self):
        with self._lock:
            return self.snapshot.round, self.snapshot.state_hash

    def _adopt(self, snap: StateSnapshot) -> None:
        with self._lock:
            self.snapshot = snap
        self.servicer.set_snapshot(snap)

    def record(self, kind: str, **fields) -> None:
        self.out.write(json.dumps({"kind": kind, "peer_id": self.a.peer_id, "time": round(time.time(), 3),
                                   **fields}) + "\n")
        self.out.flush()

    # -- protocol steps
    def heal(self, donor, why: str) -> bool:
        t0 = time.monotonic()
        try:
            snap = fetch_state(donor.address, self.schema_hash, min_round=donor.round, token=self.a.token,
                               timeout=self.a.transfer_timeout, requester=self.a.peer_id)
        except StateTransferError as e:
            log.warning("heal from %s failed: %s", donor.peer_id, e)
            return False
        if donor.state_hash and snap.round == donor.round and snap.state_hash != donor.state_hash:
            log.warning("heal from %s: state hash %s is not the coordinator's %s", donor.peer_id,
                        snap.state_hash[:12], donor.state_hash[:12])
            return False
        self._adopt(snap)
        self.record("heal", round=snap.round, state_hash=snap.state_hash, donor=donor.peer_id,
                    bytes=len(snap.payload), seconds=round(time.monotonic() - t0, 4), reason=why)
        return True

    def _sync(self, rnd: int, h: str):
        """Sync in short slices so that a stop request is noticed; None when stopping."""
        while True:
            try:
                return self.client.sync(rnd, h, timeout=1.0)
            except TimeoutError:
                if self.stop.is_set():
                    return None

    def _commit(self, rnd: int, qid: int, ok: bool, reason: str) -> Optional[CommitDecision]:
        """Vote; COMMIT, RETRY, or None = no decision before a stop."""
        stop_seen: Optional[float] = None
        while True:
            try:
                return self.client.commit(rnd, qid, ok, reason=reason, timeout=1.0)
            except TimeoutError:
                if self.stop.is_set():
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen > self.a.stop_grace_s:
                        return None

    def run(self) -> int:
        a = self.a
        info = self.client.join(timeout=a.join_timeout)
        self.client.start_heartbeat()
        rnd, h = self.state()
        self.record("start", round=rnd, state_hash=h, address=self.address, committed_round=info.committed_round)
        # a healed peer syncs at once: it enters the round in progress (with no inner steps of its own)
        # instead of chasing the others, who do not wait for a peer that is downloading
        healed = info.must_heal and info.donor is not None and self.heal(info.donor, "joined behind")
        while not self.stop.is_set():
            rnd, h = self.state()
            if rnd >= a.rounds:
                self.stop_reason = "done"
                break
            if not healed and self.stop.wait(a.step_s):
                break
            healed = False
            while not self.stop.is_set():  # one round: sync until a quorum commits it or we must heal
                ans = self._sync(rnd, h)
                if ans is None:
                    break
                if isinstance(ans, HealOrder):
                    healed = ans.donor is not None and self.heal(ans.donor, ans.reason)
                    if not healed:
                        self.stop.wait(0.2)
                    break
                if ans.round != rnd:  # not an answer to this sync: ask again
                    continue
                ok = not (a.fail_commit_at is not None and rnd == a.fail_commit_at and not self.failed_commit)
                if not ok:
                    self.failed_commit = True
                decision = self._commit(rnd, ans.quorum_id, ok, "" if ok else "--fail-commit-at")
                if decision is None:
                    break
                if decision is CommitDecision.RETRY:
                    self.record("retry", round=rnd, quorum_id=ans.quorum_id, members=ans.ids)
                    continue
                new = StateSnapshot(rnd + 1, outer_step(self.snapshot.payload, rnd, a.state_bytes),
                                    meta_json=self.snapshot.meta_json)
                self._adopt(new)
                self.record("round", round=rnd, quorum_id=ans.quorum_id, members=ans.ids,
                            state_hash=new.state_hash, state_hash_before=h)
                break
        return 0

    def leave(self) -> None:
        self.client.leave(self.stop_reason or "stopped")
        self.record("leave", reason=self.stop_reason or "stopped", round=self.state()[0])

    def close(self) -> None:
        self.client.close()
        self.server.stop(0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dtrain.sim.control_peer",
                                description="A model-free dtrain peer (tests and benchmarks).")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--peer-id", required=True)
    p.add_argument("--rounds", type=int, required=True, help="stop once the state of this round is held")
    p.add_argument("--out", required=True, help="JSON-lines record of starts, heals, retries, rounds, leaves")
    p.add_argument("--token", default="")
    p.add_argument("--region", default="")
    p.add_argument("--step-s", type=float, default=0.1, help="simulated inner steps per round (seconds)")
    p.add_argument("--state-bytes", type=int, default=65536)
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="state transfer chunk size")
    p.add_argument("--schema", default="sim", help="model config stand-in; peers of a run must agree")
    p.add_argument("--fail-commit-at", type=int, default=None, help="vote not ok once at this round")
    p.add_argument("--join-timeout", type=float, default=60.0, help="give up joining after this long")
    p.add_argument("--rpc-timeout", type=float, default=5.0)
    p.add_argument("--transfer-timeout", type=float, default=30.0)
    p.add_argument("--stop-grace-s", type=float, default=2.0, help="on a signal, wait this long for a vote's "
                                                                     "decision before leaving")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.rounds < 0 or a.state_bytes < 0 or a.step_s < 0:
        p.error("--rounds, --state-bytes and --step-s must be >= 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, stream=sys.stderr,
                        format=f"[sim_peer {a.peer_id}][%(levelname)s] %(message)s")
    with open(a.out, "a", encoding="utf-8") as out:
        try:
            peer = SimPeer(a, out)
        except (OSError, ValueError) as e:
            print(f"sim_peer {a.peer_id}: error: {e}", file=sys.stderr, flush=True)
            return 1

        def on_signal(signum, frame):
            peer.stop_reason = signal.Signals(signum).name
            peer.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            rc = peer.run()
            peer.leave()
            return rc
        except ControlError as e:
            print(f"sim_peer {a.peer_id}: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 1
        finally:
            peer.close()


if __name__ == "__main__":
    sys.exit(main())
