"""A model-free DiLoCo peer: the real outer loop without the supernet (tests, benchmarks).

    python -m dtrain.sim.model_free_peer --coordinator HOST:PORT --peer-id p1 --rounds 8 --out p1.jsonl
           [--numel 100000] [--codecs fp32,int8] [--backends grpc,gloo] [--fragments 2]
           [--error-feedback] [--poison-round R] [--step-s 0.0] [--deadline-s 10]
           [--wait-peers N] [--rounds-file F] [--slow-push-s S [--slow-round R]] [--trace]

Everything but the inner steps is the production path: GlobalState, the
RoundEngine (sync / collective / commit / retry / heal), the codecs, error
feedback, the outer Nesterov optimizer, the Peer service (state transfer and
the gRPC collective's inbox), the gloo backend. "Training" is replaced by a
deterministic per-peer perturbation, theta_local = theta_global + noise(seed,
peer, round), so peers hold different pseudo-gradients but every peer that
commits a round must end with the same global state bits.

Round r uses codec ``codecs[r mod C]`` and backend ``backends[(r div C) mod B]``
and fragment ``r mod F``, so one short run covers every combination.
``--poison-round R`` makes this peer send garbage (NaN floats / invalid
scales) in every attempt of round R, to test exclusion. By default it behaves
like a hostile (or silently broken) sender: it does not notice its own
garbage and votes ok whatever its collective saw, so only the receivers'
reports can keep the garbage out; ``--poison-honest`` makes it notice (its
own encoding is refused, it votes not ok). Once excluded it re-joins; when
round R commits without it, it is behind and heals from a donor (a ``heal``
record), then takes part again with clean payloads (the poison is tied to
round R). Each committed round and heal is appended to ``--out`` as JSON.

Test knobs. ``--wait-peers N`` holds the first round until N peers have
joined (so that a quorum of everyone forms from round 0). ``--slow-push-s S``
sleeps S seconds before each shard chunk the ``grpc`` collective sends (only
in the first attempt of round ``--slow-round``, when given), so that a
collective lasts long enough to be interrupted. ``--rounds-file F``: once F
exists, the number in it replaces ``--rounds``, so a test can stop every peer
at the same round boundary (nobody is left waiting for a quorum). Round
records carry ``attempt_log`` (one entry per collective attempt: quorum id,
members, start/end wall time, seconds, ok, error, culprit) and
``gloo_groups`` (gloo process groups built so far); ``--trace`` also writes
an ``attempt`` record when a collective starts.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
import hashlib
import json
import logging
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..comm.collective import Collective, CollectiveError, CollectiveResult, Group
from ..comm.grpc_allreduce import GrpcCollective
from ..comm.peer_service import PeerServicer, serve_peer
from ..control.client import ControlError, CoordinatorClient, HealOrder
from ..wire.schema import schema_hash
from ..wire.codec import Codec, CodecError
from ..outer.codecs import get_codec
from ..outer.error_feedback import ErrorFeedback
from ..outer.global_state import GlobalState
from ..outer.outer_opt import OuterNesterov
from ..peer.round_engine import RoundEngine
from ..wire.outcomes import RoundOutcome

log = logging.getLogger("dtrain.outer")


class PoisonedCodec(Codec):
    """Encodes garbage of the right length: NaN floats, or invalid int scales.

    ``notice=False``: decoding garbage gives zeros instead of a CodecError, i.e. this peer does not notice
    its own garbage (the others' codecs still refuse it)."""

    def __init__(self, inner: Codec, notice: bool = True):
        self.inner, self.name, self.notice = inner, inner.name, notice
        self.block_size = getattr(inner, "block_size", 1)  # the grpc collective aligns shards on it

    @property
    def lossless(self) -> bool:  # the gloo collective picks its algorithm by it: same as everyone's
        return self.inner.lossless

    def encoded_size(self, numel: int) -> int:
        return self.inner.encoded_size(numel)

    def encode(self, x: torch.Tensor) -> bytes:
        if self.inner.name == "fp32":
            return torch.full((x.numel(),), float("nan")).numpy().tobytes()
        return b"\xff" * self.inner.encoded_size(x.numel())

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        try:
            return self.inner.decode(payload, numel)
        except CodecError:
            if self.notice:
                raise
            return torch.zeros(numel)


class PoisonedCollective(Collective):
    """Sends garbage through this peer's own collective ``target``: NaN input (what gloo's native fp32 sum
    sends) and, for the call, a :class:`PoisonedCodec` in place of its codec (what every other path
    sends). The same collective object, so gloo reuses the quorum's process group as everyone else does.

    ``hostile``: claims success whatever the collective saw, so the peer votes ok. The returned zeros are
    never applied: the receivers refuse the garbage and vote not ok, so no quorum with it commits."""

    def __init__(self, inner: Collective, target: Collective, hostile: bool):
        self.inner, self.target, self.name, self.hostile = inner, target, inner.name, hostile

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        codec = self.target.codec
        self.target.codec = PoisonedCodec(codec, notice=not self.hostile)
        try:
            return self.inner.allreduce_mean(torch.full_like(flat, float("nan")), group, deadline_s)
        except CollectiveError as e:
            if not self.hostile:
                raise
            log.warning("poisoned round %d: ignoring the failed collective and voting ok (%s)", group.round, e)
            return CollectiveResult(torch.zeros_like(flat), 0, 0, 0.0)
        finally:
            self.target.codec = codec


class SlowGrpcCollective(GrpcCollective):
    """The grpc collective with a pause before every shard chunk it sends (``--slow-push-s``).

    With ``slow_round`` >= 0 only the first attempt (quorum) of that round is slow, so that its retry
    is as quick as any other round."""

    def __init__(self, *args, slow_push_s: float = 0.0, slow_round: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.slow_push_s, self.slow_round = slow_push_s, slow_round
        self._slow_quorum: Optional[int] = None

    def _is_slow(self, fields) -> bool:
        if self.slow_push_s <= 0:
            return False
        if self.slow_round < 0:
            return True
        if fields["round"] != self.slow_round:
            return False
        with self._lock:
            if self._slow_quorum is None:
                self._slow_quorum = fields["quorum_id"]
            return fields["quorum_id"] == self._slow_quorum

    def _chunks(self, fields, payload, first, last, pushes):
        slow = self._is_slow(fields)
        for msg in super()._chunks(fields, payload, first, last, pushes):
            if slow:
                time.sleep(self.slow_push_s)
            yield msg


class TimedCollective(Collective):
    """Wraps a collective: logs every attempt (members, wall times, outcome) for the round records."""

    def __init__(self, inner: Collective, on_start=None):
        self.inner, self.name, self.on_start = inner, inner.name, on_start
        self.log: List[dict] = []

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        entry = {"quorum_id": group.quorum_id, "round": group.round, "members": [m[0] for m in group.members],
                 "start": time.time(), "ok": False, "error": "", "culprit": ""}
        self.log.append(entry)
        if self.on_start is not None:
            self.on_start(entry)
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


class SimPeer:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.schema = schema_hash({"sim_peer": a.numel, "fragments": a.fragments})
        g = torch.Generator().manual_seed(a.seed)
        theta = torch.randn(a.numel, generator=g)
        self.state = GlobalState([("theta", theta), ("velocity", torch.zeros(a.numel))])
        self.frags = fragments_of(a.numel, a.fragments)
        self.codecs = a.codecs.split(",")
        self.backends = a.backends.split(",")
        self.opt = OuterNesterov(a.outer_lr, 0.9, True)
        self.ef = ErrorFeedback() if a.error_feedback else None
        from ..comm.shard_inbox import ShardInbox

        self.inbox = ShardInbox()
        self.servicer = PeerServicer(self.schema, a.peer_id, inbox=self.inbox)
        self.server, port = serve_peer(self.servicer, "127.0.0.1", a.port, token=a.token)
        self.address = f"127.0.0.1:{port}"
        self.client = CoordinatorClient(a.coordinator, a.peer_id, self.address, self.schema, token=a.token,
                                        rpc_timeout=a.rpc_timeout,
                                        state_fn=lambda: (self.state.round, self.state.hash()))
        self.collectives: Dict[Tuple[str, str], Collective] = {}
        self.engine = RoundEngine(self.client, None, self.state, self.publish, a.peer_id, self.schema,
                                  token=a.token, deadline_s=a.deadline_s, sync_timeout_s=a.sync_timeout_s)
        self.out = open(a.out, "a", encoding="utf-8")
        self.stop = None

    def publish(self) -> None:
        self.servicer.set_snapshot(self.state.snapshot({"sim": True}))

    def record(self, kind: str, **fields) -> None:
        self.out.write(json.dumps({"kind": kind, "peer": self.a.peer_id, "time": time.time(), **fields}) + "\n")
        self.out.flush()

    def collective(self, backend: str, codec_name: str):
        key = (backend, codec_name)
        if key not in self.collectives:
            codec = get_codec(codec_name, self.a.block_size)
            if backend == "gloo":
                from ..comm.gloo_allreduce import GlooCollective

                self.collectives[key] = GlooCollective(codec)
            else:
                self.collectives[key] = SlowGrpcCollective(codec, self.a.peer_id, token=self.a.token,
                                                           chunk_bytes=self.a.chunk_bytes, streams=self.a.streams,
                                                           inbox=self.inbox, slow_push_s=self.a.slow_push_s,
                                                           slow_round=self.a.slow_round)
        return self.collectives[key]

    def target_rounds(self) -> int:
        """--rounds, or the round count in --rounds-file once that file exists (a shared stop line)."""
        if self.a.rounds_file:
            try:
                with open(self.a.rounds_file, encoding="utf-8") as f:
                    return int(f.read().strip())
            except (FileNotFoundError, ValueError):
                pass
        return self.a.rounds

    def gloo_groups(self) -> int:
        """gloo process groups built so far, over every gloo collective of this peer."""
        return sum(getattr(c, "groups_built", 0) for c in self.collectives.values())

    def wait_for_peers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.client.status().members) < n and self.stop is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} peers did not join within {timeout:g}s")
            time.sleep(0.05)

    def run(self) -> int:
        a = self.a
        self.publish()
        info = self.client.join(timeout=a.join_timeout)
        self.client.start_heartbeat()
        if a.wait_peers > 0:
            self.wait_for_peers(a.wait_peers, a.join_timeout)
        if info.must_heal and info.donor is not None:
            out = self.engine.heal(HealOrder(info.donor, info.committed_round, "joined behind"))
            if out is not None:
                self.record("heal", round=out.round, state_hash=self.state.hash(), **asdict(out.heal))
        while self.state.round < self.target_rounds() and self.stop is None:
            r = self.state.round
            time.sleep(a.step_s)
            if self.stop is not None:  # a signal during the "inner steps": leave before the next round
                break
            codec_name = self.codecs[r % len(self.codecs)]
            backend = self.backends[(r // len(self.codecs)) % len(self.backends)]
            f = r % len(self.frags)
            lo, hi = self.frags[f]
            noise = torch.randn(hi - lo, generator=torch.Generator().manual_seed(_seed(a.seed, a.peer_id, r))) * a.noise
            delta = -noise  # theta_global - theta_local with theta_local = theta_global + noise
            codec = get_codec(codec_name, a.block_size)
            payload = self.ef.quantize_with_feedback(f"f{f}", delta, codec) if self.ef else delta
            poison = r == a.poison_round
            real = self.collective(backend, codec_name)
            timed = TimedCollective(real, on_start=self._on_attempt if a.trace else None)
            self.engine.collective = PoisonedCollective(timed, real, not a.poison_honest) if poison else timed
            out = self.engine.exchange(payload, f"f{f}",
                                       lambda rnd, qid, mean, span=(lo, hi): self.state.outer_step(mean, span, self.opt))
            if out.outcome is RoundOutcome.HEAL:
                if self.ef:
                    self.ef.reset()
                self.record("heal", round=out.round, state_hash=self.state.hash(), **asdict(out.heal))
                continue
            self.state.install(out.next_state)
            self.publish()
            self.record("round", round=out.round, quorum_id=out.quorum_id, members=out.members,
                        state_hash=self.state.hash(), bytes_sent=out.bytes_sent, bytes_recv=out.bytes_recv,
                        comm_s=out.comm_s, wait_s=out.wait_s, attempts=out.attempts, codec=codec_name,
                        backend=backend, fragment=f, numel=hi - lo, gloo_groups=self.gloo_groups(),
                        attempt_log=timed.log)
        self.record("done", round=self.state.round, stop=self.stop or "")
        return 0

    def _on_attempt(self, entry: dict) -> None:
        self.record("attempt", round=entry["round"], quorum_id=entry["quorum_id"], members=entry["members"])

    def close(self, reason: str) -> None:
        self.client.leave(reason)
        self.client.close()
        for c in self.collectives.values():
            c.close()
        self.server.stop(0)
        self.out.close()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dtrain.sim.model_free_peer", description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--peer-id", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--numel", type=int, default=10_000)
    p.add_argument("--codecs", default="fp32")
    p.add_argument("--backends", default="grpc")
    p.add_argument("--fragments", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--error-feedback", action="store_true")
    p.add_argument("--poison-round", type=int, default=-1,
                   help="send garbage (NaN floats / invalid int scales) in every attempt of this round")
    p.add_argument("--poison-honest", action="store_true",
                   help="the poisoned peer notices its own garbage and votes not ok (default: it votes ok)")
    p.add_argument("--step-s", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--sync-timeout-s", type=float, default=60.0)
    p.add_argument("--rpc-timeout", type=float, default=5.0)
    p.add_argument("--join-timeout", type=float, default=30.0)
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--token", default="")
    p.add_argument("--rounds-file", default="",
                   help="once this file exists, the round count it holds replaces --rounds (stop all peers "
                        "at one round boundary)")
    p.add_argument("--wait-peers", type=int, default=0,
                   help="hold the first round until this many peers have joined")
    p.add_argument("--slow-push-s", type=float, default=0.0,
                   help="grpc backend: sleep this long before sending each shard chunk")
    p.add_argument("--slow-round", type=int, default=-1,
                   help="--slow-push-s only in the first attempt of this round (-1: every round)")
    p.add_argument("--port", type=int, default=0, help="data-plane port (0: the OS picks)")
    p.add_argument("--trace", action="store_true", help="also record the start of every collective attempt")
    a = p.parse_args(argv)
    for name in a.codecs.split(","):
        if name not in ("fp32", "fp16", "bf16", "int8", "int4"):
            p.error(f"--codecs: {name!r} is not a codec (fp32, fp16, bf16, int8, int4)")
    for name in a.backends.split(","):
        if name not in ("grpc", "gloo"):
            p.error(f"--backends: {name!r} is not a backend (grpc, gloo)")
    if a.numel < a.fragments or a.fragments < 1:
        p.error("--fragments must be in 1..numel")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{a.peer_id}] %(levelname)s %(message)s")
    torch.set_num_threads(1)
    peer = SimPeer(a)

    def on_signal(signum, frame):
        peer.stop = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rc = 0
    try:
        rc = peer.run()
    except (ControlError, TimeoutError) as e:
        print(f"sim_peer {a.peer_id}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        peer.close(peer.stop or "finished")
    return rc


if __name__ == "__main__":
    sys.exit(main())
