"""Unit tests of the state transfer (dtrain.comm.peer_service, dtrain.comm.state_download) over a real local
gRPC server."""

from __future__ import annotations

import hashlib
import re
import threading
import time

import grpc
import pytest

from dtrain.comm.peer_service import PeerServicer
from dtrain.comm.state_download import StateTransferError, fetch_state, ping
from dtrain.v1 import dtrain_pb2 as pb
from dtrain.v1 import dtrain_pb2_grpc as pb_grpc
from dtrain.wire.snapshot import MAX_CHUNK_BYTES, StateSnapshot, state_hash

SCHEMA = "a" * 64


def _payload(n: int, seed: bytes = b"x") -> bytes:
    out, i = [], 0
    while 32 * len(out) < n:
        out.append(hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
        i += 1
    return b"".join(out)[:n]


@pytest.mark.timeout(30)
def test_round_trip_multi_chunk(served):
    blobs = [("w", _payload(10_000, b"w")), ("b", _payload(333, b"b")), ("empty", b"")]
    snap = StateSnapshot.from_blobs(7, blobs, meta_json='{"step": 12}')
    svc = PeerServicer(SCHEMA, peer_id="donor", chunk_bytes=1024)
    svc.set_snapshot(snap)
    addr = served(svc)
    got = fetch_state(addr, SCHEMA, min_round=7, requester="t")
    assert got.round == 7
    assert got.payload == snap.payload
    assert got.state_hash == state_hash(snap.payload) == hashlib.sha256(snap.payload).hexdigest()
    assert got.meta_json == '{"step": 12}'
    assert got.named_blobs() == blobs
    assert got.blob("b") == blobs[1][1]
    assert ping(addr, SCHEMA) == ("donor", 7, snap.state_hash)


@pytest.mark.timeout(30)
def test_empty_payload_and_chunk_limits(served):
    svc = PeerServicer(SCHEMA)
    svc.set_snapshot(StateSnapshot(0, b""))
    got = fetch_state(served(svc), SCHEMA)
    assert got.payload == b"" and got.state_hash == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValueError, match="chunk_bytes"):
        PeerServicer(SCHEMA, chunk_bytes=MAX_CHUNK_BYTES + 1)


@pytest.mark.timeout(30)
def test_max_chunk_fits_the_message_limits(served):
    data = _payload(MAX_CHUNK_BYTES + 100)
    svc = PeerServicer(SCHEMA, chunk_bytes=MAX_CHUNK_BYTES)
    svc.set_snapshot(StateSnapshot(1, data))
    assert fetch_state(served(svc), SCHEMA).payload == data


@pytest.mark.timeout(30)
def test_hash_mismatch_is_refused(served):
    good = _payload(5000)
    bad = bytearray(good)
    bad[4321] ^= 0x01
    svc = PeerServicer(SCHEMA, chunk_bytes=1000)
    svc.set_snapshot(StateSnapshot(3, bytes(bad), state_hash=state_hash(good)))
    with pytest.raises(StateTransferError, match="hash mismatch"):
        fetch_state(served(svc), SCHEMA)


class _Truncating(PeerServicer):
    def StreamState(self, request, context):
        for i, chunk in enumerate(super().StreamState(request, context)):
            if i == 2:
                return
            yield chunk


@pytest.mark.timeout(30)
def test_truncated_stream_is_refused(served):
    svc = _Truncating(SCHEMA, chunk_bytes=1000)
    svc.set_snapshot(StateSnapshot(1, _payload(5500)))
    with pytest.raises(StateTransferError, match=r"truncated: .*\(2000 of 5500 bytes\)"):
        fetch_state(served(svc), SCHEMA, streams=1)


class _Misplacing(PeerServicer):
    def StreamState(self, request, context):
        for chunk in super().StreamState(request, context):
            yield pb.StateChunk(offset=chunk.offset + 1, data=chunk.data)


@pytest.mark.timeout(30)
def test_chunk_at_wrong_offset_is_refused(served):
    svc = _Misplacing(SCHEMA, chunk_bytes=1000)
    svc.set_snapshot(StateSnapshot(1, _payload(3000)))
    # streams fetch byte ranges in parallel: whichever range is checked first reports its chunk
    with pytest.raises(StateTransferError, match=r"chunk at offset \d+, expected \d+") as err:
        fetch_state(served(svc), SCHEMA)
    got, want = map(int, re.search(r"offset (\d+), expected (\d+)", str(err.value)).groups())
    assert got == want + 1 and want in (0, 1000, 2000)


class _Stalling(PeerServicer):
    release = threading.Event()

    def StreamState(self, request, context):
        for i, chunk in enumerate(super().StreamState(request, context)):
            if i == 1:
                self.release.wait(10)
            yield chunk


@pytest.mark.timeout(30)
def test_stall_is_detected_by_the_chunk_deadline(served):
    svc = _Stalling(SCHEMA, chunk_bytes=1000)
    svc.release = threading.Event()
    svc.set_snapshot(StateSnapshot(1, _payload(3000)))
    t0 = time.monotonic()
    try:
        with pytest.raises(StateTransferError, match="stalled: no chunk for 0.5s at offset 1000"):
            fetch_state(served(svc), SCHEMA, chunk_timeout=0.5, streams=1)
    finally:
        svc.release.set()
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(30)
def test_wrong_schema_is_failed_precondition(served):
    svc = PeerServicer(SCHEMA)
    svc.set_snapshot(StateSnapshot(1, b"abc"))
    addr = served(svc)
    with pytest.raises(StateTransferError, match="FAILED_PRECONDITION: schema hash bbbbbbbbbbbb... differs") as ei:
        fetch_state(addr, "b" * 64)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(StateTransferError, match="FAILED_PRECONDITION"):
        ping(addr, "b" * 64)


@pytest.mark.timeout(30)
def test_min_round_waits_then_aborts(served):
    svc = PeerServicer(SCHEMA, min_round_wait_s=0.6)
    svc.set_snapshot(StateSnapshot(4, b"old"))
    addr = served(svc)
    t0 = time.monotonic()
    with pytest.raises(StateTransferError, match="ABORTED: holds round 4, older than the requested round 5") as ei:
        fetch_state(addr, SCHEMA, min_round=5)
    assert ei.value.code == grpc.StatusCode.ABORTED
    assert 0.5 <= time.monotonic() - t0 < 5


@pytest.mark.timeout(30)
def test_min_round_wait_ends_when_a_newer_state_arrives(served):
    svc = PeerServicer(SCHEMA, min_round_wait_s=5.0)
    svc.set_snapshot(StateSnapshot(4, b"old"))
    addr = served(svc)
    timer = threading.Timer(0.3, svc.set_snapshot, args=(StateSnapshot(5, b"new"),))
    timer.start()
    try:
        t0 = time.monotonic()
        got = fetch_state(addr, SCHEMA, min_round=5)
        assert got.round == 5 and got.payload == b"new"
        assert time.monotonic() - t0 < 3
    finally:
        timer.cancel()


@pytest.mark.timeout(30)
def test_no_state_yet_is_aborted(served):
    addr = served(PeerServicer(SCHEMA, min_round_wait_s=0.1))
    with pytest.raises(StateTransferError, match="holds no state"):
        fetch_state(addr, SCHEMA)


@pytest.mark.timeout(30)
def test_token_required(served):
    svc = PeerServicer(SCHEMA)
    svc.set_snapshot(StateSnapshot(1, b"secret state"))
    addr = served(svc, token="s3cret")
    for token in ("wrong", ""):
        with pytest.raises(StateTransferError, match="UNAUTHENTICATED") as ei:
            fetch_state(addr, SCHEMA, token=token)
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert fetch_state(addr, SCHEMA, token="s3cret").payload == b"secret state"


class _SwapAfterFirstChunk(PeerServicer):
    newer: StateSnapshot

    def StreamState(self, request, context):
        for i, chunk in enumerate(super().StreamState(request, context)):
            yield chunk
            if i == 0:
                self.set_snapshot(self.newer)


@pytest.mark.timeout(30)
def test_transfer_is_consistent_while_the_snapshot_changes(served):
    old, new = StateSnapshot(1, _payload(8000, b"old")), StateSnapshot(2, _payload(9000, b"new"))
    svc = _SwapAfterFirstChunk(SCHEMA, chunk_bytes=1000)
    svc.newer = new
    svc.set_snapshot(old)
    addr = served(svc)
    got = fetch_state(addr, SCHEMA)
    assert (got.round, got.payload, got.state_hash) == (1, old.payload, old.state_hash)
    assert svc.snapshot is new
    assert fetch_state(addr, SCHEMA).payload == new.payload


@pytest.mark.timeout(30)
def test_stream_requests_are_checked(served):
    svc = PeerServicer(SCHEMA, chunk_bytes=100, transfer_ttl_s=0.3)
    svc.set_snapshot(StateSnapshot(1, _payload(1000)))
    addr = served(svc)
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.PeerStub(ch)
        h = stub.GetStateHeader(pb.StateRequest(schema_hash=SCHEMA), timeout=5)
        svc.set_snapshot(StateSnapshot(2, b"moved on"))
        part = list(stub.StreamState(pb.StateChunkRequest(transfer_id=h.transfer_id, offset=950, length=0), timeout=5))
        assert [(c.offset, len(c.data)) for c in part] == [(950, 50)]
        ranged = list(
            stub.StreamState(pb.StateChunkRequest(transfer_id=h.transfer_id, offset=120, length=150), timeout=5)
        )
        assert [(c.offset, len(c.data)) for c in ranged] == [(120, 100), (220, 50)]
        for req, msg in [
            (pb.StateChunkRequest(transfer_id="nope"), "unknown or expired transfer id"),
            (pb.StateChunkRequest(transfer_id=h.transfer_id, offset=1001), "outside"),
            (pb.StateChunkRequest(transfer_id=h.transfer_id, offset=900, length=101), "outside"),
        ]:
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.StreamState(req, timeout=5))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in ei.value.details()
        time.sleep(0.5)  # past the TTL: the pinned transfer is dropped
        assert svc.active_transfers() == 0
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.StreamState(pb.StateChunkRequest(transfer_id=h.transfer_id), timeout=5))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_snapshot_validation():
    with pytest.raises(ValueError, match="meta_json"):
        StateSnapshot(0, b"", meta_json="{not json")
    with pytest.raises(ValueError, match="outside"):
        StateSnapshot(0, b"abc", blobs=(StateSnapshot.from_blobs(0, [("x", b"abcd")]).blobs[0],))
