"""Tests of the grpc outer collective (dtrain.comm.grpc_allreduce) and its ShardInbox over real local gRPC servers.

Members are threads of this process, each with its own PeerServicer + server on 127.0.0.1:0, except in the
process tests, where one member is a child process that is SIGKILLed / SIGSTOPped mid-collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import grpc
import numpy as np
import pytest
import torch

from dtrain.comm.collective import CollectiveError, CollectiveResult, Group
from dtrain.comm.grpc_allreduce import GrpcCollective, shard_bounds
from dtrain.comm.peer_service import PeerServicer, serve_peer
from dtrain.comm.shard_inbox import GRPC_FRAME_BYTES, ShardInbox
from dtrain.v1 import dtrain_pb2 as pb
from dtrain.v1 import dtrain_pb2_grpc as pb_grpc
from dtrain.wire.auth import make_channel
from dtrain.wire.codec import Codec, CodecError
from dtrain.wire.snapshot import MAX_MESSAGE_BYTES

from conftest import stop_servers

try:
    from dtrain.outer.codecs import CODEC_NAMES, get_codec
except ImportError:  # the codecs module is written elsewhere; the minimal codec below covers its absence
    CODEC_NAMES, get_codec = (), None

SCHEMA = "a" * 64
MARGIN_S = 1.0  # allowed overrun of the deadline (scheduling on a busy 2-core machine)


class MiniFP32(Codec):
    """A minimal lossless fp32 codec (little-endian binary32), independent of dtrain.outer.codecs."""

    name = "fp32"

    def encoded_size(self, numel: int) -> int:
        return 4 * int(numel)

    def encode(self, x: torch.Tensor) -> bytes:
        if not bool(torch.isfinite(x).all()):
            raise CodecError("fp32.encode: non-finite input")
        return x.contiguous().numpy().astype("<f4").tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        if len(payload) != 4 * numel:
            raise CodecError(f"fp32 payload: expected {4 * numel} bytes, got {len(payload)}")
        out = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(out).all()):
            raise CodecError("fp32 payload: non-finite values")
        return out

    @property
    def lossless(self) -> bool:
        return True


# every codec available: label -> factory; tolerance of the mean relative to max |x| (two quantisations)
CODECS = {"mini-fp32": MiniFP32}
CODECS.update({name: (lambda n=name: get_codec(n, block_size=128)) for name in CODEC_NAMES})
TOLERANCE = {"mini-fp32": 1e-6, "fp32": 1e-6, "fp16": 2e-3, "bf16": 2e-2, "int8": 3e-2, "int4": 0.4}


# ---------------------------------------------------------------- helpers


@dataclass
class Cluster:
    members: tuple  # (peer_id, address), ring order
    collectives: List[GrpcCollective]
    inboxes: List[ShardInbox]

    def group(self, i: int, round: int, quorum_id: int = 1, op: str = "all", members=None, weights=()) -> Group:
        members = self.members if members is None else members
        return Group(quorum_id, round, tuple(members), members[i][0], op, weights=tuple(weights))


@pytest.fixture
def cluster():
    """``start(k, ...)``: k in-process members; every collective closed and server stopped at teardown."""
    servers, collectives = [], []

    def start(
        k: int,
        codec: Callable[[], Codec] = MiniFP32,
        token: str = "",
        server_tls=None,
        client_tls=None,
        chunk_bytes: int = 1 << 20,
        streams: int = 2,
        tokens: Optional[Sequence[str]] = None,
        codecs: Optional[dict] = None,
        **inbox_kw,
    ) -> Cluster:
        members, cols, inboxes = [], [], []
        for i in range(k):
            pid = f"p{i}"
            inbox = ShardInbox(**inbox_kw)
            server, port = serve_peer(
                PeerServicer(SCHEMA, pid, inbox=inbox), token=token, tls=server_tls, max_workers=16
            )
            servers.append(server)
            c = (codecs or {}).get(pid, codec)()
            col = GrpcCollective(
                c,
                pid,
                token=tokens[i] if tokens else token,
                tls=client_tls,
                chunk_bytes=chunk_bytes,
                streams=streams,
                inbox=inbox,
            )
            collectives.append(col)
            members.append((pid, f"127.0.0.1:{port}"))
            cols.append(col)
            inboxes.append(inbox)
        return Cluster(tuple(members), cols, inboxes)

    try:
        yield start
    finally:
        for c in collectives:
            c.close()
        stop_servers(servers)


def run_all(calls, timeout: float = 30.0):
    """Run ``calls`` (no-argument functions) in threads; returns [(result or exception, seconds)]."""
    out = [None] * len(calls)

    def run(i):
        t = time.monotonic()
        try:
            r = calls[i]()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            r = e
        out[i] = (r, time.monotonic() - t)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a member is still running"
    return out


def allreduce(c: Cluster, xs, round: int, deadline_s: float = 20.0, **group_kw):
    calls = [
        lambda i=i: c.collectives[i].allreduce_mean(xs[i], c.group(i, round, **group_kw), deadline_s)
        for i in range(len(c.collectives))
    ]
    return run_all(calls, timeout=deadline_s + 10)


def reference(xs, codec: Codec) -> torch.Tensor:
    """The algorithm in one place: owner i sums D(E(x_j[shard i])) in ring order, divides, and all decode E(mean)."""
    k, n = len(xs), xs[0].numel()
    out = torch.empty(n)
    for start, m in shard_bounds(n, k, getattr(codec, "block_size", 1)):
        s = torch.zeros(m)
        for x in xs:
            s.add_(codec.decode(codec.encode(x[start : start + m].contiguous()), m))
        out[start : start + m] = codec.decode(codec.encode(s.div_(k)), m)
    return out


def weighted_reference(xs, codec: Codec, weights) -> torch.Tensor:
    """``reference`` with weights, its float32 arithmetic written out in numpy: owner i adds
    ``fl(w_j * D(E(x_j[shard i])))`` in ring order from zeros (skipping w_j = 0), divides by sum(w), and
    everyone decodes E(that)."""
    k, n = len(xs), xs[0].numpy().size
    out = torch.empty(n)
    for start, m in shard_bounds(n, k, getattr(codec, "block_size", 1)):
        s = np.zeros(m, dtype=np.float32)
        for x, w in zip(xs, weights):
            if w:
                s = s + codec.decode(codec.encode(x[start : start + m].contiguous()), m).numpy() * np.float32(w)
        out[start : start + m] = codec.decode(codec.encode(torch.from_numpy(s / np.float32(sum(weights)))), m)
    return out


def ok_results(outs) -> List[CollectiveResult]:
    for r, _ in outs:
        if isinstance(r, Exception):
            raise AssertionError(f"a member failed: {r!r}")
    return [r for r, _ in outs]


def assert_all_fail(outs, deadline_s: float):
    for r, seconds in outs:
        assert isinstance(r, CollectiveError), f"expected CollectiveError, got {r!r}"
        assert seconds <= deadline_s + MARGIN_S, f"raised after {seconds:.2f}s (deadline {deadline_s}s)"


# ---------------------------------------------------------------- (a) mean and bit parity


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec_name", sorted(CODECS))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_mean_is_bit_identical_on_every_member(cluster, codec_name, k):
    c = cluster(k, codec=CODECS[codec_name], chunk_bytes=1000)  # 1000: chunks cut values apart
    codec = CODECS[codec_name]()
    gen = torch.Generator().manual_seed(1000 * k + len(codec_name))
    for rnd, n in enumerate([1, 7, k * 37 + 1, 1001, 12_345]):  # 12_345: multi-chunk on 2 streams
        xs = [torch.randn(n, generator=gen) * (1 + j) for j in range(k)]
        results = ok_results(allreduce(c, xs, rnd))
        first = results[0].tensor
        assert first.dtype == torch.float32 and first.shape == (n,)
        for r in results[1:]:
            assert torch.equal(r.tensor, first)
        assert torch.equal(first, reference(xs, codec))  # the fixed reduction order, exactly
        mean64 = torch.stack([x.double() for x in xs]).mean(0)
        scale = max(float(torch.stack(xs).abs().max()), 1e-30)
        assert float((first.double() - mean64).abs().max()) <= TOLERANCE[codec_name] * scale
    for inbox in c.inboxes:
        assert inbox.open_groups() == [] and inbox.early_bytes() == 0
    # channels stay open across calls: one per (destination, lane)
    assert all(len(col._channels) <= (k - 1) * 2 for col in c.collectives)


# ring order (k = 4: a 0, whose member holds huge values); 13-14-bit weights, so that w * part is not exact in
# float32 even for the few significant bits of decoded fp16 / int8 / int4 values
WEIGHTED = {2: (8191, 12345), 4: (4099, 0, 12289, 1)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec_name", sorted(CODECS))
@pytest.mark.parametrize("k", sorted(WEIGHTED))
def test_weighted_mean_is_bit_identical_and_follows_the_weights(cluster, codec_name, k):
    """Unequal weights: every member has the same bits, those of the weighted owner sums of the decoded
    slices in ring order (fp32: within float32 rounding of the float64 weighted mean); a 0-weight member's
    values, however large, count for nothing; all weights 1: exactly the bits of the unweighted group."""
    c = cluster(k, codec=CODECS[codec_name], chunk_bytes=1000)
    codec = CODECS[codec_name]()
    weights = WEIGHTED[k]
    huge = 0.5e4 if codec_name == "fp16" else 1e30  # fp16 holds |x| <= 65504
    gen = torch.Generator().manual_seed(77 * k + len(codec_name))
    w64 = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    for rnd, n in enumerate([7, k * 37 + 1, 12_345]):
        xs = [torch.randn(n, generator=gen) * (huge if w == 0 else 1 + j) for j, w in enumerate(weights)]
        results = ok_results(allreduce(c, xs, 3 * rnd, weights=weights))
        first = results[0].tensor
        assert first.dtype == torch.float32 and first.shape == (n,)
        assert all(torch.equal(r.tensor, first) for r in results[1:])
        assert torch.equal(first, weighted_reference(xs, codec, weights))
        mean64 = (w64 * torch.stack([x.double() for x in xs])).sum(0) / sum(weights)
        scale = float((w64 * torch.stack([x.abs().double() for x in xs])).sum(0).max()) / sum(weights)
        if codec.lossless:
            assert float((first.double() - mean64).abs().max()) <= (k + 1) * 2.0**-24 * scale
        else:  # the huge values are ignored: the error is that of the weighted members' scale
            assert float((first.double() - mean64).abs().max()) <= TOLERANCE[codec_name] * scale
        ones = ok_results(allreduce(c, xs, 3 * rnd + 1, weights=(1,) * k))
        plain = ok_results(allreduce(c, xs, 3 * rnd + 2))
        assert all(bits(r.tensor) == bits(plain[0].tensor) for r in ones + plain)
    # finite inputs whose weighted sum overflows: the owners refuse to encode it (k = 2: both owners fail at
    # once; with more, a member whose slices are all delivered may only learn of it at the deadline)
    if k == 2 and codec_name != "fp16":
        xs = [torch.full((1000,), 1e35 * (1 + j)) for j in range(k)]
        outs = allreduce(c, xs, 99, deadline_s=5.0, weights=weights)
        assert_all_fail(outs, 5.0)
        assert any("cannot encode" in str(r) for r, _ in outs)


def bits(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


@pytest.mark.timeout(30)
def test_one_member_and_empty_tensor(cluster):
    c = cluster(1)
    x = torch.randn(10)
    ((r, _),) = allreduce(c, [x], 0)
    assert torch.equal(r.tensor, x) and r.bytes_sent == r.bytes_recv == 0
    c3 = cluster(3)
    results = ok_results(allreduce(c3, [torch.empty(0)] * 3, 0))
    assert all(r.tensor.numel() == 0 for r in results)


# ---------------------------------------------------------------- (b) byte counters


@pytest.mark.timeout(30)
@pytest.mark.parametrize("codec_name", ["mini-fp32"] + [n for n in ("int8",) if n in CODECS])
def test_byte_counters_match_the_formula(cluster, codec_name):
    k, n, cb = 3, 10_001, 4096
    c = cluster(k, codec=CODECS[codec_name], chunk_bytes=cb)
    codec = CODECS[codec_name]()
    xs = [torch.randn(n) for _ in range(k)]
    results = ok_results(allreduce(c, xs, 0))
    bounds = shard_bounds(n, k, getattr(codec, "block_size", 1))
    for r_idx, res in enumerate(results):
        sizes = [codec.encoded_size(m) for _, m in bounds]
        # phase 1: my slice of each other shard; phase 2: my mean shard to each other member
        sent = [s for i, s in enumerate(sizes) if i != r_idx] + [sizes[r_idx]] * (k - 1)
        recv = [sizes[r_idx]] * (k - 1) + [s for i, s in enumerate(sizes) if i != r_idx]
        for counted, parts in ((res.bytes_sent, sent), (res.bytes_recv, recv)):
            payload = sum(parts)
            chunks = sum(-(-p // cb) for p in parts)
            # per chunk: the 5-byte gRPC frame plus the header fields (ids, codec, sizes, offset)
            assert payload + chunks * GRPC_FRAME_BYTES < counted <= payload + chunks * 64
        bpv = codec.encoded_size(n) / n
        assert res.bytes_sent == pytest.approx(2 * (k - 1) / k * n * bpv, rel=0.02)
    assert sum(r.bytes_sent for r in results) == sum(r.bytes_recv for r in results)


# ---------------------------------------------------------------- (c) a member that never shows up


@pytest.mark.timeout(40)
@pytest.mark.parametrize("absent", ["refused", "blackhole", "idle"])
def test_absent_member_fails_everyone_within_the_deadline(cluster, absent):
    deadline = 1.5
    c = cluster(2, max_early_bytes=1 << 20)
    extra = []
    try:
        if absent == "refused":  # nothing listens there
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            addr = f"127.0.0.1:{s.getsockname()[1]}"
            s.close()
        elif absent == "blackhole":  # a TCP listener that never speaks HTTP/2
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            extra.append(s)
            addr = f"127.0.0.1:{s.getsockname()[1]}"
        else:  # a running peer whose collective never starts
            idle = cluster(1, max_early_bytes=1000, early_wait_s=0.3)
            addr = idle.members[0][1]
        members = c.members + (("absent", addr),)
        outs = allreduce(c, [torch.randn(5000), torch.randn(5000)], 0, deadline_s=deadline, members=members)
        assert_all_fail(outs, deadline)
        for inbox in c.inboxes:
            assert inbox.open_groups() == []  # dropped on failure
    finally:
        for s in extra:
            s.close()


# ---------------------------------------------------------------- (d) a member process dies mid-collective

CHILD = r"""
import json, sys, time
import numpy as np, torch
from dtrain.comm.collective import Group
from dtrain.comm.grpc_allreduce import GrpcCollective
from dtrain.comm.shard_inbox import ShardInbox
from dtrain.comm.peer_service import PeerServicer, serve_peer
from dtrain.wire.codec import Codec

class SlowFP32(Codec):
    # sends its first slice at once, then stalls: the parent signals it mid-phase-1
    name, calls = "fp32", 0
    def encoded_size(self, n): return 4 * n
    def encode(self, x):
        SlowFP32.calls += 1
        if SlowFP32.calls == 2:
            print("SLOW", flush=True)
            time.sleep(120)
        return x.contiguous().numpy().astype("<f4").tobytes()
    def decode(self, payload, n):
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))

me = sys.argv[1]
inbox = ShardInbox()
server, port = serve_peer(PeerServicer("a" * 64, me, inbox=inbox))
print("PORT", port, flush=True)
spec = json.loads(sys.stdin.readline())
group = Group(spec["quorum_id"], spec["round"], tuple(tuple(m) for m in spec["members"]), me)
col = GrpcCollective(SlowFP32(), me, chunk_bytes=4096, inbox=inbox)
col.allreduce_mean(torch.randn(spec["numel"]), group, spec["deadline"])
print("DONE", flush=True)
"""


@pytest.fixture
def children():
    """Start child member processes; each one still running is SIGKILLed by its PID at teardown."""
    procs: List[subprocess.Popen] = []

    def start(peer_id: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, peer_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def _read_line(p: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    box = []
    t = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    line = box[0] if box else ""
    assert line.startswith(prefix), f"child said {line!r}, expected {prefix!r}"
    return line.strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_member_process_dies_mid_collective(cluster, children, sig):
    deadline, n = 4.0, 200_000
    c = cluster(2, chunk_bytes=4096)
    child = children("p2")
    port = int(_read_line(child, "PORT").split()[1])
    members = c.members + (("p2", f"127.0.0.1:{port}"),)
    child.stdin.write(
        json.dumps({"quorum_id": 1, "round": 0, "members": members, "numel": n, "deadline": deadline}) + "\n"
    )
    child.stdin.flush()
    outs = []
    t = threading.Thread(
        target=lambda: outs.extend(
            allreduce(c, [torch.randn(n), torch.randn(n)], 0, deadline_s=deadline, members=members)
        )
    )
    t.start()
    try:
        _read_line(child, "SLOW", timeout=deadline + 5)  # phase 1 under way: one slice sent, the next one stalls
        os.kill(child.pid, sig)
    finally:
        t.join(deadline + 10)
    assert_all_fail(outs, deadline)
    for inbox in c.inboxes:
        assert inbox.open_groups() == []


# ---------------------------------------------------------------- (e) garbage from a member


class _Lenient(MiniFP32):
    """A broken member: its decode accepts anything, so it never notices its own garbage."""

    def decode(self, payload, numel):
        raw = np.frombuffer(bytes(payload)[: 4 * numel].ljust(4 * numel, b"\0"), dtype="<f4")
        return torch.from_numpy(raw.astype(np.float32))


class NaNSender(_Lenient):
    def encode(self, x):  # skips the finiteness check
        return x.contiguous().numpy().astype("<f4").tobytes()


class ShortSender(_Lenient):
    def encode(self, x):
        return super().encode(x)[:-4]


class LongSender(_Lenient):
    def encode(self, x):
        return super().encode(x) + b"\0\0\0\0"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bad", [NaNSender, ShortSender, LongSender], ids=["nan", "short", "long"])
def test_garbage_sender_is_named_as_culprit(cluster, bad, k):
    n, deadline = 3001, 5.0
    c = cluster(k, codecs={"p1": bad}, chunk_bytes=1024)
    xs = [torch.randn(n) for _ in range(k)]
    xs[1][::5] = float("nan") if bad is NaNSender else 1.0
    outs = allreduce(c, xs, 0, deadline_s=deadline)
    assert_all_fail(outs, deadline)
    honest = [outs[i][0].culprit for i in range(k) if i != 1]
    # The first member to receive a whole bad slice names p1; p1 then fails and cancels its other pushes,
    # so a member whose slice from p1 never arrived has no evidence: it fails without naming anyone.
    if k == 2:
        assert honest == ["p1"], outs
    else:
        assert "p1" in honest, outs
    assert set(honest) <= {"p1", None}
    assert outs[1][0].culprit != "p1"


# ---------------------------------------------------------------- (e, f) the inbox's checks, chunk by chunk


@pytest.fixture
def inbox_server():
    """``start(**inbox_kw)`` -> (inbox, stub); servers stopped at teardown."""
    servers, channels = [], []

    def start(token: str = "", **kw):
        inbox = ShardInbox(**kw)
        server, port = serve_peer(PeerServicer(SCHEMA, "p0", inbox=inbox), token=token)
        servers.append(server)
        ch = make_channel(f"127.0.0.1:{port}", None, MAX_MESSAGE_BYTES)
        channels.append(ch)
        return inbox, pb_grpc.PeerStub(ch)

    try:
        yield start
    finally:
        for ch in channels:
            ch.close()
        stop_servers(servers)


MEMBERS = ("p0", "p1", "p2")
NUMEL = 10  # p0 owns shard 0 of 10 values: expects (1, 0, p1), (1, 0, p2), (2, 1, p1), (2, 2, p2)


def _open(inbox: ShardInbox, round: int) -> tuple:
    key = (7, round, "all")
    inbox.open(
        key,
        "p0",
        MEMBERS,
        MiniFP32(),
        {(1, 0, "p1"): NUMEL, (1, 0, "p2"): NUMEL, (2, 1, "p1"): NUMEL, (2, 2, "p2"): NUMEL},
    )
    return key


def _chunk(round: int, data: bytes, offset: int = 0, **kw) -> pb.ShardChunk:
    fields = dict(
        quorum_id=7,
        round=round,
        op="all",
        phase=1,
        shard=0,
        sender="p1",
        codec="fp32",
        numel=NUMEL,
        total_bytes=4 * NUMEL,
        offset=offset,
        data=data,
    )
    fields.update(kw)
    return pb.ShardChunk(**fields)


def _push(stub, chunks, metadata=()) -> Optional[grpc.StatusCode]:
    try:
        stub.PushShard(iter(chunks), timeout=5, metadata=metadata)
        return None
    except grpc.RpcError as e:
        return e.code()


GOOD = MiniFP32().encode(torch.arange(NUMEL, dtype=torch.float32))
NAN = np.full(NUMEL, np.nan, dtype="<f4").tobytes()

BAD_CHUNKS = {
    "wrong numel": [_chunk(0, GOOD, numel=NUMEL + 1)],
    "wrong total_bytes": [_chunk(0, GOOD, total_bytes=4 * NUMEL + 4)],
    "wrong codec": [_chunk(0, GOOD, codec="int8")],
    "wrong shard": [_chunk(0, GOOD, shard=2)],
    "outside total": [_chunk(0, GOOD[:8], offset=36)],
    "overlap": [_chunk(0, GOOD[:20]), _chunk(0, GOOD[16:], offset=16)],
    "non-finite": [_chunk(0, NAN)],
    "empty chunk": [_chunk(0, b"")],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_invalid_chunks_fail_the_collective_naming_the_sender(inbox_server, case):
    inbox, stub = inbox_server()
    key = _open(inbox, 0)
    assert _push(stub, BAD_CHUNKS[case]) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(CollectiveError) as err:
        inbox.wait(key, 1, time.monotonic() + 5)
    assert err.value.culprit == "p1"
    # the failed collective refuses further chunks at once, so senders stop early
    assert _push(stub, [_chunk(0, GOOD, sender="p2")]) == grpc.StatusCode.FAILED_PRECONDITION
    inbox.close(key, "failed")


@pytest.mark.timeout(30)
def test_chunks_assemble_out_of_order_across_streams(inbox_server):
    inbox, stub = inbox_server()
    key = _open(inbox, 0)
    assert _push(stub, [_chunk(0, GOOD[24:], offset=24), _chunk(0, GOOD[:8])]) is None
    assert _push(stub, [_chunk(0, GOOD[8:24], offset=8)]) is None
    assert _push(stub, [_chunk(0, GOOD, sender="p2")]) is None
    got = inbox.wait(key, 1, time.monotonic() + 5)
    assert torch.equal(got[(0, "p1")], torch.arange(NUMEL, dtype=torch.float32))
    assert inbox.bytes_received(key) == sum(
        c.ByteSize() + 5
        for c in [
            _chunk(0, GOOD[24:], offset=24),
            _chunk(0, GOOD[:8]),
            _chunk(0, GOOD[8:24], offset=8),
            _chunk(0, GOOD, sender="p2"),
        ]
    )
    inbox.close(key)


@pytest.mark.timeout(30)
def test_refusals_for_strangers_unknown_and_closed_groups(inbox_server):
    inbox, stub = inbox_server(max_early_bytes=1000, early_wait_s=0.2)
    key = _open(inbox, 0)
    # a non-member, or someone claiming to be this peer: refused, the collective unharmed
    assert _push(stub, [_chunk(0, GOOD, sender="mallory")]) == grpc.StatusCode.PERMISSION_DENIED
    assert _push(stub, [_chunk(0, GOOD, sender="p0")]) == grpc.StatusCode.PERMISSION_DENIED
    assert _push(stub, [_chunk(0, GOOD), _chunk(0, GOOD, sender="p2")]) is None
    assert set(inbox.wait(key, 1, time.monotonic() + 5)) == {(0, "p1"), (0, "p2")}
    inbox.close(key)
    # a closed group: refused at once
    t = time.monotonic()
    assert _push(stub, [_chunk(0, GOOD)]) == grpc.StatusCode.FAILED_PRECONDITION
    assert time.monotonic() - t < 0.2
    # a group nobody opened: buffered up to the bound, then refused after a short wait
    big = [_chunk(5, GOOD, sender="p1", offset=0)] + [_chunk(5, b"x" * 400, offset=40 * i) for i in range(1, 4)]
    assert _push(stub, big) == grpc.StatusCode.FAILED_PRECONDITION
    assert inbox.early_bytes() <= 1000


@pytest.mark.timeout(30)
def test_slightly_early_chunks_are_buffered_then_used(inbox_server):
    inbox, stub = inbox_server()
    assert _push(stub, [_chunk(1, GOOD)]) is None  # before the collective opens here
    assert _push(stub, [_chunk(1, GOOD, sender="mallory")]) is None  # buffered, dropped on open
    assert inbox.early_bytes() > 0
    key = _open(inbox, 1)
    assert inbox.early_bytes() == 0
    assert _push(stub, [_chunk(1, GOOD, sender="p2")]) is None
    got = inbox.wait(key, 1, time.monotonic() + 5)
    assert torch.equal(got[(0, "p1")], got[(0, "p2")])
    inbox.close(key)


@pytest.mark.timeout(30)
def test_memory_bound_and_missing_inbox(inbox_server):
    inbox, _ = inbox_server(max_bytes=100)
    with pytest.raises(CollectiveError, match="receive buffers"):
        inbox.open((1, 1, "all"), "p0", MEMBERS, MiniFP32(), {(1, 0, "p1"): 20, (1, 0, "p2"): 20})
    server, port = serve_peer(PeerServicer(SCHEMA, "no-inbox"))
    try:
        with make_channel(f"127.0.0.1:{port}", None, MAX_MESSAGE_BYTES) as ch:
            assert _push(pb_grpc.PeerStub(ch), [_chunk(0, GOOD)]) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop_servers([server])


# ---------------------------------------------------------------- (g) token and TLS


@pytest.mark.timeout(30)
def test_token_is_required(cluster, inbox_server):
    inbox, stub = inbox_server(token="s3cret")
    _open(inbox, 0)
    assert _push(stub, [_chunk(0, GOOD)]) == grpc.StatusCode.UNAUTHENTICATED
    assert _push(stub, [_chunk(0, GOOD)], (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert _push(stub, [_chunk(0, GOOD)], (("authorization", "Bearer s3cret"),)) is None
    # with the token the collective works; a member holding a wrong one makes every member fail
    c = cluster(3, token="s3cret")
    xs = [torch.randn(1000) for _ in range(3)]
    results = ok_results(allreduce(c, xs, 0))
    assert torch.equal(results[0].tensor, results[2].tensor)
    bad = cluster(3, token="s3cret", tokens=["s3cret", "wrong", "s3cret"])
    outs = allreduce(bad, xs, 0, deadline_s=3.0)
    assert_all_fail(outs, 3.0)
    assert "UNAUTHENTICATED" in str(outs[1][0])


@pytest.mark.timeout(30)
def test_tls(cluster, tmp_path):
    from dtrain.config import TLSConfig
    from dtrain.control import certs

    files = certs.generate(str(tmp_path / "certs"), hosts=["localhost", "127.0.0.1"], clients=["client"])
    c = cluster(
        3,
        token="t",
        server_tls=TLSConfig(cert=files.server_cert, key=files.server_key),
        client_tls=TLSConfig(ca=files.ca_cert),
        chunk_bytes=4096,
    )
    xs = [torch.randn(3000) for _ in range(3)]
    results = ok_results(allreduce(c, xs, 0))
    assert torch.equal(results[0].tensor, reference(xs, MiniFP32()))
    assert all(torch.equal(r.tensor, results[0].tensor) for r in results)


# ---------------------------------------------------------------- a long link


class DelayProxy:
    """A TCP relay to ``target`` that holds every block it forwards for ``one_way_s`` (a long WAN link)."""

    def __init__(self, target_port: int, one_way_s: float):
        self.target_port, self.one_way_s = target_port, one_way_s
        self.sockets: List[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                a, _ = self.listener.accept()
                b = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [a, b]
                for src, dst in ((a, b), (b, a)):
                    threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()
        except OSError:
            return

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    return
                time.sleep(self.one_way_s)
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for s in [self.listener] + self.sockets:
            s.close()


@pytest.mark.timeout(30)
def test_long_link_connects(cluster):
    c = cluster(2)
    proxy = DelayProxy(int(c.members[1][1].rsplit(":", 1)[1]), one_way_s=0.3)
    try:
        members = (c.members[0], ("p1", proxy.address))  # p0 reaches p1 over a 600 ms round trip
        xs = [torch.randn(1000), torch.randn(1000)]
        results = ok_results(allreduce(c, xs, 0, deadline_s=5.0, members=members))
        assert torch.equal(results[0].tensor, results[1].tensor)
    finally:
        proxy.close()


# ---------------------------------------------------------------- (h) throughput


@pytest.mark.timeout(60)
def test_64mib_on_four_members(cluster):
    k, n = 4, 16 << 20  # 16 Mi float32 values = 64 MiB
    c = cluster(k)
    xs = [torch.randn(n) for _ in range(k)]
    t = time.monotonic()
    results = ok_results(allreduce(c, xs, 0, deadline_s=40.0))
    seconds = time.monotonic() - t
    first = results[0].tensor
    assert all(torch.equal(r.tensor, first) for r in results)
    mean = xs[0].clone()
    for x in xs[1:]:
        mean.add_(x)
    assert torch.allclose(first, mean.div_(k), atol=1e-6)
    mib = n * 4 / 2**20
    wire = results[0].bytes_sent / 2**20
    print(
        f"\n64 MiB on {k} in-process members: {seconds:.2f}s, {mib / seconds:.1f} MiB/s of tensor, "
        f"{wire:.1f} MiB sent per member ({wire / seconds:.1f} MiB/s each way per member)"
    )


def test_shard_bounds_align_to_codec_blocks():
    for n, k, a in [(1000, 3, 128), (128 * 7 + 5, 4, 128), (100, 3, 128), (5, 4, 128), (10, 3, 1), (0, 2, 128)]:
        b = shard_bounds(n, k, a)
        assert len(b) == k and sum(m for _, m in b) == n
        assert all(b[i][0] + b[i][1] == b[i + 1][0] for i in range(k - 1))
        if -(-n // a) >= k:
            assert all(start % a == 0 for start, _ in b)
