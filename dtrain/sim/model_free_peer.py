"""The model-free peer: a real peer leader without the supernet (tests, benchmarks, ``dtrain-sim``).

    python -m dtrain.sim.model_free_peer --coordinator HOST:PORT --peer-id p1 --rounds 8 --out p1.jsonl
           [--backends grpc,gloo | --backends none] [--codecs fp32,int8] [--fragments 2] [--numel 10000]
           [--error-feedback] [--step-s 0.0] [--deadline-s 10] [--wait-peers N] [--rounds-file F]
           [--fail-commit-at R] [--schema S] [--transfer-chunk-bytes B] [--trace] [--verbose]

Everything but the inner steps is the production path: the peer lifecycle of
:class:`dtrain.peer.session.PeerSession` (serve the Peer service and the shard
inbox, join and heal first when behind, renew the lease, install and publish
each S_{r+1}, leave), its :class:`~dtrain.peer.round_engine.RoundEngine` (sync /
collective / prepare / commit / retry / heal) with a ``prepare`` that returns
``GlobalState.outer_step`` (the outer Nesterov step on S_r), the codecs, error
feedback and the collectives. "Training" is replaced by a deterministic
pseudo-gradient, so every peer that commits a round must end with the same
state bits (the state hash in its ``round`` records).

Two modes, by ``--backends``:

- data plane (``grpc``, ``gloo`` or both): the pseudo-gradient of peer p in
  round r is ``-noise(seed, p, r)``, different on every peer, and the mean goes
  through the real collective. Round r uses codec ``codecs[r mod C]``, backend
  ``backends[(r div C) mod B]`` and fragment ``r mod F``, so one short run
  covers every combination.
- ``none``: the control plane only, light enough for tests that start many
  peers. There is no collective: every member's pseudo-gradient is
  ``-noise(seed, r)``, a function of the seed and the round alone, the same on
  every peer, so the quorum's mean is known without an exchange and the engine
  runs with :class:`KnownMean` (the payload itself, no bytes moved). The
  quorum still syncs, votes and commits, and each commit is the real outer
  step on the GlobalState; heals are real state transfers. It does NOT
  exercise the data plane (codecs, collectives, error feedback; ``--codecs``
  does not apply, ``--error-feedback`` is refused).

Knobs. ``--wait-peers N`` holds the first round until N peers have joined (a
quorum of everyone from round 0). ``--rounds-file F``: once F exists, the
number in it replaces ``--rounds``, so a test can stop every peer at the same
round boundary. ``--fail-commit-at R`` votes not ok once, in the first attempt
of round R (the round is retried with a new quorum id). A peer that healed
syncs again at once (no inner steps): it enters the round in progress instead
of chasing the others. Faults are injected only through
``dtrain.faults.wrap("collective", collective, round=r, peer_id=...)``, called
once per round where the peer picks its collective (see ``dtrain.faults``).

Records: ``--out`` gets one JSON object per line (flushed), each with ``kind``,
``peer_id`` and ``time``:

- ``start``: ``round``/``state_hash`` of the state held before joining,
  ``address``, ``committed_round`` (the coordinator's, at the join);
- ``heal``: ``round``/``state_hash`` adopted, ``donor``, ``bytes``, ``seconds``, ``reason``;
- ``attempt`` (``--trace`` only): a collective attempt starts: ``round``, ``quorum_id``, ``members``;
- ``retry``: an attempt that did not commit: ``round``, ``quorum_id``, ``members``, ``error``
  (the collective's, empty when the vote failed);
- ``round``: ``round`` committed, ``quorum_id``, ``members``, ``state_hash`` (of S_{r+1}),
  ``state_hash_before`` (of S_r), ``bytes_sent``, ``bytes_recv``, ``comm_s``, ``wait_s``,
  ``attempts``, ``codec``, ``backend``, ``fragment``, ``numel``, ``gloo_groups`` (gloo process
  groups built so far) and ``attempt_log`` (per collective attempt: quorum id, members, start/end
  wall time, seconds, ok, error, culprit);
- ``done``: the loop ended: ``round`` held, ``stop`` (the signal's name, or empty);
- ``leave``: after the graceful Leave: ``reason``, ``round``; the last record.

SIGTERM / SIGINT: finish the call in flight (a round whose collective or vote
is under way still commits), leave, exit 0. A refusal by the coordinator
(another schema, a duplicate peer id, a bad token ...) is one line on stderr
and exit status 1, without a Leave.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from typing import Dict, List, Tuple

import torch

from .. import faults
from ..comm.collective import Collective, CollectiveError, CollectiveResult, Group
from ..config import AuthConfig, ControlConfig
from ..control.client import ControlError, Stopping
from ..errors import one_line
from ..outer.codecs import get_codec
from ..outer.error_feedback import ErrorFeedback
from ..outer.global_state import GlobalState
from ..outer.outer_opt import OuterNesterov
from ..peer.round_engine import ExchangeResult, VoteNotOk
from ..peer.session import ExchangeSettings, PeerSession, build_collective
from ..wire.outcomes import RoundOutcome
from ..wire.schema import schema_hash
from ..wire.snapshot import DEFAULT_CHUNK_BYTES

log = logging.getLogger("dtrain.sim")

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
BACKENDS = ("grpc", "gloo", "none")


class KnownMean(Collective):
    """``--backends none``: every member holds the same payload, so the mean is this member's payload.

    Nothing is exchanged (no bytes, no deadline); the caller guarantees the payloads are identical."""

    name = "none"

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        return CollectiveResult(flat.clone(), 0, 0, 0.0)


class TimedCollective(Collective):
    """Records every attempt of the collective it wraps (members, wall times, outcome) for the round records."""

    def __init__(self, inner: Collective, on_start=None):
        self.inner, self.name, self.on_start = inner, inner.name, on_start
        self.log: List[dict] = []

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        entry = {
            "quorum_id": group.quorum_id,
            "round": group.round,
            "members": [m[0] for m in group.members],
            "start": time.time(),
            "ok": False,
            "error": "",
            "culprit": "",
        }
        self.log.append(entry)
        if self.on_start is not None:
            self.on_start(self.log)
        t0 = time.perf_counter()
        try:
            result = self.inner.allreduce_mean(flat, group, deadline_s)
            entry["ok"] = True
            return result
        except CollectiveError as e:
            entry["error"], entry["culprit"] = str(e)[:300], e.culprit or ""
            raise
        finally:
            entry["seconds"], entry["end"] = time.perf_counter() - t0, time.time()

    def close(self) -> None:
        self.inner.close()


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def fragments_of(numel: int, f: int) -> List[Tuple[int, int]]:
    bounds = [numel * i // f for i in range(f + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(f)]


def run_schema(a: argparse.Namespace) -> str:
    """What the peers of a run must share: the state's shape and the round schedule."""
    return schema_hash(
        {
            "model_free": {
                "numel": a.numel,
                "fragments": a.fragments,
                "codecs": a.codecs,
                "backends": a.backends,
                "block_size": a.block_size,
                "schema": a.schema,
            }
        }
    )


class ModelFreePeer:
    def __init__(self, a: argparse.Namespace):
        self.args = a
        self.stopping = threading.Event()
        self.stop_reason = ""
        theta = torch.randn(a.numel, generator=torch.Generator().manual_seed(a.seed))
        self.state = GlobalState([("theta", theta), ("velocity", torch.zeros(a.numel))])
        self.frags = fragments_of(a.numel, a.fragments)
        self.codecs, self.backends = a.codecs.split(","), a.backends.split(",")
        self.data_plane = self.backends != ["none"]
        self.opt = OuterNesterov(a.outer_lr, 0.9, True)
        self.ef = ErrorFeedback() if a.error_feedback else None
        self.control = ControlConfig(
            coordinator=a.coordinator,
            host="127.0.0.1",
            port=a.port,
            region=a.region,
            join_timeout_s=a.join_timeout,
            rpc_timeout_s=a.rpc_timeout,
            transfer_timeout_s=a.transfer_timeout,
            auth=AuthConfig(a.token),
        )
        self.settings = ExchangeSettings(self.backends[0], a.streams, a.chunk_bytes, a.deadline_s, a.sync_timeout_s)
        self.collectives: Dict[Tuple[str, str], Collective] = {}
        self.failed_vote = False
        self.out = open(a.out, "a", encoding="utf-8")
        try:
            self.session = PeerSession(
                a.peer_id,
                self.control,
                run_schema(a),
                self.state,
                None,
                self.settings,
                should_stop=self.stopping.is_set,
                meta={"model_free": True},
                transfer_chunk_bytes=a.transfer_chunk_bytes,
            )
        except BaseException:
            self.out.close()
            raise

    # -- records ----------------------------------------------------------------------------
    def record(self, kind: str, **fields) -> None:
        self.out.write(json.dumps({"kind": kind, "peer_id": self.args.peer_id, "time": time.time(), **fields}) + "\n")
        self.out.flush()

    def _record_heal(self, out: ExchangeResult) -> None:
        assert out.heal is not None
        self.record("heal", round=out.round, state_hash=self.state.hash(), **dataclasses.asdict(out.heal))

    def _record_retry(self, attempt: dict) -> None:
        self.record(
            "retry",
            round=attempt["round"],
            quorum_id=attempt["quorum_id"],
            members=attempt["members"],
            error=attempt["error"],
        )

    def _on_attempt(self, attempts: List[dict]) -> None:
        """A collective attempt starts: the one before it in this exchange did not commit."""
        if len(attempts) > 1:
            self._record_retry(attempts[-2])
        if self.args.trace:
            e = attempts[-1]
            self.record("attempt", round=e["round"], quorum_id=e["quorum_id"], members=e["members"])

    # -- helpers ------------------------------------------------------------------------------
    def target_rounds(self) -> int:
        """--rounds, or the round count in --rounds-file once that file exists (a shared stop line)."""
        if self.args.rounds_file:
            try:
                with open(self.args.rounds_file, encoding="utf-8") as f:
                    return int(f.read().strip())
            except (FileNotFoundError, ValueError):
                pass
        return self.args.rounds

    def collective(self, backend: str, codec_name: str) -> Collective:
        key = (backend, codec_name)
        if key not in self.collectives:
            if backend == "none":
                self.collectives[key] = KnownMean()
            else:
                s = self.session
                self.collectives[key] = build_collective(
                    get_codec(codec_name, self.args.block_size),
                    dataclasses.replace(self.settings, backend=backend),
                    self.args.peer_id,
                    self.control,
                    s.token,
                    s.inbox,
                )
        return self.collectives[key]

    def gloo_groups(self) -> int:
        """gloo process groups built so far, over every gloo collective of this peer."""
        return sum(getattr(c, "groups_built", 0) for c in self.collectives.values())

    def wait_for_peers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.session.client.status().members) < n and not self.stopping.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} peers did not join within {timeout:g}s")
            time.sleep(0.05)

    def payload(self, r: int, fragment: int, codec_name: str) -> torch.Tensor:
        """This peer's pseudo-gradient of round r: theta_global - theta_local, theta_local = theta_global + noise."""
        a = self.args
        lo, hi = self.frags[fragment]
        seed = _seed(a.seed, a.peer_id, r) if self.data_plane else _seed(a.seed, r)
        delta = -torch.randn(hi - lo, generator=torch.Generator().manual_seed(seed)) * a.noise
        if self.ef is not None:
            return self.ef.quantize_with_feedback(f"f{fragment}", delta, get_codec(codec_name, a.block_size))
        return delta

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        start_round, start_hash = self.state.round, self.state.hash()
        healed = self.session.join()
        joined = self.session.client.joined
        self.record(
            "start",
            round=start_round,
            state_hash=start_hash,
            address=self.session.address,
            committed_round=joined.committed_round if joined is not None else 0,
        )
        if healed is not None:
            self._record_heal(healed)
        if a.wait_peers > 0:
            self.wait_for_peers(a.wait_peers, a.join_timeout)
        skip_steps = healed is not None
        while self.state.round < self.target_rounds() and not self.stopping.is_set():
            if not skip_steps and self.stopping.wait(a.step_s):  # the "inner steps"; a signal: leave now
                break
            skip_steps = False
            r = self.state.round
            codec_name = self.codecs[r % len(self.codecs)] if self.data_plane else "none"
            backend = self.backends[(r // len(self.codecs)) % len(self.backends)]
            f = r % len(self.frags)
            payload = self.payload(r, f, codec_name)
            real = self.collective(backend, codec_name)
            timed = TimedCollective(faults.wrap("collective", real, round=r, peer_id=a.peer_id), self._on_attempt)
            self.session.engine.collective = timed
            before = self.state.hash()
            try:
                out = self.session.engine.exchange(
                    payload, f"f{f}", lambda rnd, qid, mean, covered, f=f: self._prepare(rnd, f, mean)
                )
            except Stopping as e:
                log.info("%s", e)
                if timed.log:
                    self._record_retry(timed.log[-1])
                break
            if out.outcome is RoundOutcome.HEAL:
                if timed.log:
                    self._record_retry(timed.log[-1])
                if self.ef is not None:
                    self.ef.reset()
                self._record_heal(out)
                skip_steps = True
                continue
            assert out.next_state is not None
            self.session.install(out.next_state)
            lo, hi = self.frags[f]
            self.record(
                "round",
                round=out.round,
                quorum_id=out.quorum_id,
                members=out.members,
                state_hash=self.state.hash(),
                state_hash_before=before,
                bytes_sent=out.bytes_sent,
                bytes_recv=out.bytes_recv,
                comm_s=out.comm_s,
                wait_s=out.wait_s,
                attempts=out.attempts,
                codec=codec_name,
                backend=backend,
                fragment=f,
                numel=hi - lo,
                gloo_groups=self.gloo_groups(),
                attempt_log=timed.log,
            )
        self.record("done", round=self.state.round, stop=self.stop_reason)

    def _prepare(self, rnd: int, fragment: int, mean: torch.Tensor) -> GlobalState:
        """Before the vote on ``rnd``: S_{rnd+1}; --fail-commit-at refuses it once."""
        if rnd == self.args.fail_commit_at and not self.failed_vote:
            self.failed_vote = True
            raise VoteNotOk("--fail-commit-at")
        return self.state.outer_step(mean, self.frags[fragment], self.opt)

    def close(self, leave: bool) -> None:
        reason = self.stop_reason or "finished"
        try:
            self.session.close(leave, reason)
            for c in self.collectives.values():
                c.close()
            if leave:
                self.record("leave", reason=reason, round=self.state.round)
        finally:
            self.out.close()


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def _non_negative(kind):
    def parse(text: str):
        v = kind(text)
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return v

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.sim.model_free_peer",
        description="The model-free peer: a real peer leader without the supernet.",
    )
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--peer-id", required=True)
    p.add_argument("--rounds", type=_non_negative(int), default=5, help="stop once the state of this round is held")
    p.add_argument("--out", required=True, help="JSON-lines records (see the module docstring)")
    p.add_argument("--numel", type=_positive(int), default=10_000, help="parameters (theta; velocity as many)")
    p.add_argument(
        "--backends",
        default="grpc",
        help="grpc,gloo: round r's collective (see the docstring); none: no data plane (identical "
        "pseudo-gradients on every peer, no exchange)",
    )
    p.add_argument("--codecs", default="fp32", help="round r's codec: codecs[r mod C] (data plane only)")
    p.add_argument("--fragments", type=_positive(int), default=1)
    p.add_argument("--block-size", type=_positive(int), default=128)
    p.add_argument("--error-feedback", action="store_true")
    p.add_argument("--step-s", type=_non_negative(float), default=0.0, help='seconds of "inner steps" per round')
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schema", default="sim", help="model config stand-in: peers of a run must agree")
    p.add_argument("--deadline-s", type=_positive(float), default=10.0, help="collective deadline")
    p.add_argument("--sync-timeout-s", type=_positive(float), default=60.0)
    p.add_argument("--rpc-timeout", type=_positive(float), default=5.0)
    p.add_argument("--join-timeout", type=_positive(float), default=30.0)
    p.add_argument("--transfer-timeout", type=_positive(float), default=30.0, help="state transfer (heal) timeout")
    p.add_argument(
        "--transfer-chunk-bytes",
        type=_positive(int),
        default=DEFAULT_CHUNK_BYTES,
        help="chunk size of the state this peer serves to joiners",
    )
    p.add_argument("--chunk-bytes", type=_positive(int), default=1 << 20, help="grpc collective chunk size")
    p.add_argument("--streams", type=_positive(int), default=2, help="grpc collective streams per destination")
    p.add_argument("--token", default="", help="the run's token (default: $DTRAIN_TOKEN)")
    p.add_argument("--region", default="")
    p.add_argument("--port", type=int, default=0, help="data-plane port (0: the OS picks)")
    p.add_argument(
        "--rounds-file",
        default="",
        help="once this file exists, the round count it holds replaces --rounds (stop all peers at one round boundary)",
    )
    p.add_argument("--wait-peers", type=int, default=0, help="hold the first round until this many peers have joined")
    p.add_argument("--fail-commit-at", type=int, default=None, help="vote not ok once, in round R")
    p.add_argument("--trace", action="store_true", help="also record the start of every collective attempt")
    p.add_argument("--verbose", action="store_true", help="log at INFO level")
    a = p.parse_args(argv)
    for name in a.codecs.split(","):
        if name not in CODECS:
            p.error(f"--codecs: {name!r} is not a codec ({', '.join(CODECS)})")
    backends = a.backends.split(",")
    for name in backends:
        if name not in BACKENDS:
            p.error(f"--backends: {name!r} is not a backend ({', '.join(BACKENDS)})")
    if "none" in backends and backends != ["none"]:
        p.error("--backends: none (no data plane) cannot be mixed with grpc or gloo")
    if backends == ["none"] and a.error_feedback:
        p.error("--error-feedback needs a data plane: not with --backends none")
    if a.numel < a.fragments:
        p.error("--fragments must be in 1..numel")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING,
        stream=sys.stderr,
        format=f"[{a.peer_id}] %(levelname)s %(message)s",
    )
    torch.set_num_threads(1)
    try:
        peer = ModelFreePeer(a)
    except (OSError, ValueError) as e:  # a port in use, an unwritable --out, a bad --coordinator ...
        print(f"model_free_peer {a.peer_id}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1

    def on_signal(signum, frame):
        peer.stop_reason = peer.stop_reason or signal.Signals(signum).name
        peer.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    rc, leave = 0, True
    try:
        peer.run()
    except ControlError as e:  # a refusal: nothing to leave
        print(f"model_free_peer {a.peer_id}: error: {one_line(e)}", file=sys.stderr, flush=True)
        rc, leave = 1, False
    except TimeoutError as e:
        print(f"model_free_peer {a.peer_id}: error: {one_line(e)}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        peer.close(leave)
    return rc


if __name__ == "__main__":
    sys.exit(main())
