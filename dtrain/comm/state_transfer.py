"""State transfer over the ``Peer`` gRPC service: a donor serves its global state, a joiner fetches it.

Wire format. A snapshot is one byte string, the **payload**: the state's named
blobs laid end to end (each blob's name, dtype, shape, byte offset and length
travel in the header as ``TensorMeta``), plus ``meta_json`` for the non-tensor
state. Its **state hash** is ``sha256(payload).hexdigest()`` (64 lowercase hex
digits); round and ``meta_json`` are not part of it. No pickle anywhere.

Protocol. ``GetStateHeader`` checks the requester's schema hash
(FAILED_PRECONDITION if it differs) and ``min_round`` (the donor waits up to
``min_round_wait_s`` for a state that new, else ABORTED), then pins the
snapshot it holds under a fresh ``transfer_id``: every chunk of that transfer
comes from those bytes even if the donor moves on to a newer round. Pinned
transfers are dropped after ``transfer_ttl_s`` without use. ``StreamState``
streams ``[offset, offset + length)`` of a pinned payload (length 0: to the
end) in chunks of at most ``chunk_bytes`` (1 MiB by default, never over
4 MiB); an unknown transfer id or a range outside the payload is
INVALID_ARGUMENT. Chunks are offset-addressed, so a later receiver can fetch
disjoint ranges over several streams or from several donors.

Client. :func:`fetch_state` gets the header, streams the chunks (``streams`` byte ranges in
parallel), checks every
chunk's offset and size, the total length and the hash, and raises
:class:`StateTransferError` (one line, with the gRPC code where there is one)
on any refusal, mismatch, truncation or stall (no chunk within
``chunk_timeout``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import grpc

from ..control.auth import BlockingTokenInterceptor, auth_metadata, channel_options, make_channel, server_credentials
from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from . import shard_wire

log = logging.getLogger("dtrain.comm")

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
# a chunk message is its data plus a few bytes of framing; both ends allow that much
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def state_hash(payload: Union[bytes, bytearray, memoryview]) -> str:
    """The state hash of a payload: ``sha256(payload)`` as 64 lowercase hex digits."""
    return hashlib.sha256(payload).hexdigest()


class StateTransferError(RuntimeError):
    """A state transfer failed; ``code`` is the gRPC status code when a peer refused."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class BlobMeta:
    """Where one named blob lies in the payload; dtype / shape describe a tensor's bytes."""

    name: str
    offset: int
    nbytes: int
    dtype: str = "uint8"
    shape: Tuple[int, ...] = ()


@dataclass(frozen=True)
class StateSnapshot:
    """S_round as bytes: the payload, its blobs, ``meta_json``, and ``state_hash`` (computed if empty)."""

    round: int
    payload: bytes
    meta_json: str = "{}"
    blobs: Tuple[BlobMeta, ...] = ()
    state_hash: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.payload, bytes):
            object.__setattr__(self, "payload", bytes(self.payload))
        object.__setattr__(self, "blobs", tuple(self.blobs))
        if self.round < 0:
            raise ValueError(f"round={self.round} is not allowed: must be >= 0")
        try:
            json.loads(self.meta_json)
        except ValueError as e:
            raise ValueError(f"meta_json is not valid JSON: {e}") from None
        names = set()
        for b in self.blobs:
            if b.offset < 0 or b.nbytes < 0 or b.offset + b.nbytes > len(self.payload):
                raise ValueError(f"blob {b.name!r} [{b.offset}, {b.offset + b.nbytes}) lies outside the "
                                 f"{len(self.payload)}-byte payload")
            if b.name in names:
                raise ValueError(f"blob name {b.name!r} appears twice")
            names.add(b.name)
        if not self.state_hash:
            object.__setattr__(self, "state_hash", state_hash(self.payload))

    @classmethod
    def from_blobs(cls, round: int, blobs: Sequence[Tuple[str, bytes]], meta_json: str = "{}") -> "StateSnapshot":
        """A snapshot of named byte blobs laid end to end in the given order."""
        metas, parts, offset = [], [], 0
        for name, data in blobs:
            data = bytes(data)
            metas.append(BlobMeta(name, offset, len(data), "uint8", (len(data),)))
            parts.append(data)
            offset += len(data)
        return cls(round, b"".join(parts), meta_json, tuple(metas))

    def blob(self, name: str) -> bytes:
        for b in self.blobs:
            if b.name == name:
                return self.payload[b.offset:b.offset + b.nbytes]
        raise KeyError(f"no blob named {name!r} in the snapshot of round {self.round}")

    def named_blobs(self) -> List[Tuple[str, bytes]]:
        return [(b.name, self.payload[b.offset:b.offset + b.nbytes]) for b in self.blobs]


# ---------------------------------------------------------------- the donor side


def _short(h: str) -> str:
    return (h[:12] + "...") if len(h) > 12 else (h or "''")


class PeerServicer(pb_grpc.PeerServicer):
    """Serves this peer's current snapshot (``set_snapshot``) to joiners and healers, and hands
    ``PushShard`` streams to ``inbox`` (a ``dtrain.comm.shard_inbox.ShardInbox``) when given."""

    def __init__(self, schema_hash: str, peer_id: str = "", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 transfer_ttl_s: float = 60.0, min_round_wait_s: float = 5.0, max_transfers: int = 64,
                 inbox=None):
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} is not allowed: 1..{MAX_CHUNK_BYTES}")
        self.schema_hash, self.peer_id, self.chunk_bytes = schema_hash, peer_id, int(chunk_bytes)
        self.transfer_ttl_s, self.min_round_wait_s, self.max_transfers = transfer_ttl_s, min_round_wait_s, max_transfers
        self._cond = threading.Condition()
        self._snapshot: Optional[StateSnapshot] = None
        self._transfers: "OrderedDict[str, List]" = OrderedDict()  # id -> [snapshot, last use]
        self.inbox = inbox

    # -- the state this peer holds
    def set_snapshot(self, snapshot: StateSnapshot) -> None:
        with self._cond:
            self._snapshot = snapshot
            self._cond.notify_all()

    @property
    def snapshot(self) -> Optional[StateSnapshot]:
        with self._cond:
            return self._snapshot

    def active_transfers(self) -> int:
        with self._cond:
            self._purge(time.monotonic())
            return len(self._transfers)

    def _purge(self, now: float) -> None:
        for tid in [t for t, (_, used) in self._transfers.items() if now - used > self.transfer_ttl_s]:
            del self._transfers[tid]
        while len(self._transfers) > self.max_transfers:
            self._transfers.popitem(last=False)

    def _check_schema(self, schema: str, context, what: str) -> None:
        if schema != self.schema_hash:
            msg = (f"schema hash {_short(schema)} differs from this peer's {_short(self.schema_hash)}: "
                   "the requester runs other code or another model config")
            log.info("refused %s: %s", what, msg)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)

    # -- RPCs
    def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        if request.schema_hash:
            self._check_schema(request.schema_hash, context, "Ping")
        snap = self.snapshot
        if snap is None:
            return pb.PingReply(peer_id=self.peer_id)
        return pb.PingReply(peer_id=self.peer_id, round=snap.round, state_hash=snap.state_hash)

    def GetStateHeader(self, request: pb.StateRequest, context) -> pb.StateHeader:
        self._check_schema(request.schema_hash, context, "GetStateHeader")
        wait = self.min_round_wait_s
        left = context.time_remaining()
        if left is not None:
            wait = max(0.0, min(wait, left - 0.05))
        with self._cond:
            self._cond.wait_for(lambda: self._snapshot is not None and self._snapshot.round >= request.min_round,
                                timeout=wait)
            snap = self._snapshot
            if snap is None or snap.round < request.min_round:
                held = "no state" if snap is None else f"round {snap.round}"
                msg = f"holds {held}, older than the requested round {request.min_round} (waited {wait:.1f}s)"
                log.info("refused GetStateHeader from %r: %s", request.requester, msg)
                context.abort(grpc.StatusCode.ABORTED, msg)
            now = time.monotonic()
            self._purge(now)
            tid = secrets.token_hex(16)
            self._transfers[tid] = [snap, now]
            self._purge(now)
        log.info("transfer %s: round %d, %d bytes to %r", tid[:8], snap.round, len(snap.payload), request.requester)
        return pb.StateHeader(
            transfer_id=tid, round=snap.round, state_hash=snap.state_hash, total_bytes=len(snap.payload),
            chunk_bytes=self.chunk_bytes, meta_json=snap.meta_json,
            tensors=[pb.TensorMeta(name=b.name, dtype=b.dtype, shape=list(b.shape), offset=b.offset,
                                   nbytes=b.nbytes) for b in snap.blobs])

    def _pinned(self, transfer_id: str) -> Optional[StateSnapshot]:
        with self._cond:
            now = time.monotonic()
            self._purge(now)
            entry = self._transfers.get(transfer_id)
            if entry is None:
                return None
            entry[1] = now
            self._transfers.move_to_end(transfer_id)
            return entry[0]

    def StreamState(self, request: pb.StateChunkRequest, context) -> Iterable[pb.StateChunk]:
        snap = self._pinned(request.transfer_id)
        if snap is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown or expired transfer id {request.transfer_id[:16]!r}: ask for a header again")
        total = len(snap.payload)
        start = request.offset
        end = total if request.length == 0 else start + request.length
        if start > total or end > total:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"range [{start}, {end}) is outside the {total}-byte state")
        view = memoryview(snap.payload)
        pos = start
        while pos < end:
            if not context.is_active():
                return
            n = min(self.chunk_bytes, end - pos)
            yield pb.StateChunk(offset=pos, data=bytes(view[pos:pos + n]))
            pos += n
            self._pinned(request.transfer_id)  # keeps a long transfer alive

    def PushShard(self, request_iterator, context) -> pb.PushAck:
        if self.inbox is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this peer runs no grpc outer collective (no shard inbox)")
        return self.inbox.push(request_iterator, context)


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def add_peer_service(servicer: PeerServicer, server: grpc.Server) -> None:
    """Register every method of the ``Peer`` service (from the proto's descriptor), like the generated
    ``add_PeerServicer_to_server``, except that ``PushShard`` requests are parsed by ``shard_wire.parse``
    (the payload stays a view of the received bytes)."""
    service = pb.DESCRIPTOR.services_by_name["Peer"]
    handlers = {}
    for m in service.methods:
        request, reply = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        parse = shard_wire.parse if m.name == "PushShard" else request.FromString
        handlers[m.name] = _HANDLER_KINDS[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name), request_deserializer=parse, response_serializer=reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _add_health(server: grpc.Server) -> None:
    """The standard gRPC health service (no token needed), SERVING for the Peer service:
    what docker healthchecks and load balancers ask."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    for name in ("", "dtrain.v1.Peer"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def serve_peer(servicer: PeerServicer, host: str = "127.0.0.1", port: int = 0, token: str = "", tls=None,
               max_workers: int = 8) -> Tuple[grpc.Server, int]:
    """Start a thread-pool gRPC server for ``servicer``; returns (server, bound port)."""
    interceptors = [BlockingTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="peer-rpc"),
                         interceptors=interceptors, options=channel_options(MAX_MESSAGE_BYTES))
    add_peer_service(servicer, server)
    _add_health(server)
    bind = f"{host}:{port}"
    creds = server_credentials(tls) if tls is not None else None
    bound = server.add_secure_port(bind, creds) if creds is not None else server.add_insecure_port(bind)
    if not bound:
        raise OSError(f"cannot bind the Peer service to {bind}")
    server.start()
    return server, bound


# ---------------------------------------------------------------- the receiver side


def _refusal(address: str, what: str, err: grpc.RpcError) -> StateTransferError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return StateTransferError(f"state transfer from {address}: {what}: {code.name}: {details}", code)


class _Watchdog:
    """Calls ``on_stall`` once when ``kick`` has not been called for ``seconds``."""

    def __init__(self, seconds: float, on_stall):
        self.seconds, self.on_stall = seconds, on_stall
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-transfer-watchdog", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(max(0.0, self._last + self.seconds - time.monotonic())):
            if time.monotonic() - self._last >= self.seconds:
                self.fired = True
                self.on_stall()
                return

    def stop(self) -> None:
        self._done.set()


def _check_header(h: pb.StateHeader, address: str, min_round: int, max_bytes: int) -> Tuple[BlobMeta, ...]:
    def bad(why: str) -> StateTransferError:
        return StateTransferError(f"state transfer from {address}: bad header: {why}")

    if not h.transfer_id:
        raise bad("empty transfer id")
    if h.round < min_round:
        raise bad(f"round {h.round} is older than the requested {min_round}")
    if not _HEX64.match(h.state_hash):
        raise bad(f"state hash {h.state_hash[:70]!r} is not 64 hex digits")
    if h.total_bytes > max_bytes:
        raise bad(f"{h.total_bytes} bytes is over the limit of {max_bytes}")
    if not 1 <= h.chunk_bytes <= MAX_CHUNK_BYTES:
        raise bad(f"chunk_bytes={h.chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}")
    try:
        json.loads(h.meta_json or "{}")
    except ValueError as e:
        raise bad(f"meta_json is not valid JSON: {e}") from None
    blobs = []
    for t in h.tensors:
        if t.offset + t.nbytes > h.total_bytes:
            raise bad(f"tensor {t.name!r} [{t.offset}, {t.offset + t.nbytes}) lies outside the "
                      f"{h.total_bytes}-byte state")
        blobs.append(BlobMeta(t.name, t.offset, t.nbytes, t.dtype, tuple(t.shape)))
    if len({b.name for b in blobs}) != len(blobs):
        raise bad("a tensor name appears twice")
    return tuple(blobs)


def _stream_range(stub, header: pb.StateHeader, address: str, md, buf: bytearray, lo: int, hi: int,
                  deadline: float, chunk_timeout: float, calls: list) -> None:
    """Receive ``[lo, hi)`` of a pinned transfer into ``buf``; StateTransferError on any misstep."""
    call = stub.StreamState(pb.StateChunkRequest(transfer_id=header.transfer_id, offset=lo, length=hi - lo),
                            timeout=max(0.001, deadline - time.monotonic()), metadata=md)
    calls.append(call)
    dog = _Watchdog(chunk_timeout, call.cancel)
    pos = lo
    try:
        for chunk in call:
            dog.kick()
            n = len(chunk.data)
            if chunk.offset != pos:
                raise StateTransferError(f"state transfer from {address}: chunk at offset {chunk.offset}, "
                                         f"expected {pos}")
            if n == 0 or n > header.chunk_bytes or pos + n > hi:
                raise StateTransferError(f"state transfer from {address}: chunk of {n} bytes at offset {pos} "
                                         f"does not fit (chunk_bytes {header.chunk_bytes}, range end {hi})")
            buf[pos:pos + n] = chunk.data
            pos += n
    except grpc.RpcError as e:
        if dog.fired:
            raise StateTransferError(f"state transfer from {address}: stalled: no chunk for {chunk_timeout:g}s "
                                     f"at offset {pos} of {header.total_bytes}",
                                     grpc.StatusCode.DEADLINE_EXCEEDED) from None
        raise _refusal(address, f"stream failed at offset {pos} of {header.total_bytes}", e) from None
    finally:
        dog.stop()
        if pos < hi:
            call.cancel()
    if pos != hi:
        raise StateTransferError(f"state transfer from {address}: truncated: the range [{lo}, {hi}) ended at {pos} "
                                 f"({pos - lo} of {hi - lo} bytes)")


def fetch_state(address: str, schema_hash: str, min_round: int = 0, token: str = "", tls=None,
                timeout: float = 30.0, chunk_timeout: float = 10.0, requester: str = "",
                max_bytes: int = 1 << 36, streams: int = 4) -> StateSnapshot:
    """Fetch the donor's state (round >= ``min_round``), verified against its length and state hash.

    The payload is split into ``streams`` contiguous ranges received in parallel (several TCP-level
    HTTP/2 streams fill a long fat pipe better than one); any failing range fails the whole transfer."""
    deadline = time.monotonic() + timeout
    md = auth_metadata(token)
    channel = make_channel(address, tls, MAX_MESSAGE_BYTES)
    try:
        stub = pb_grpc.PeerStub(channel)
        try:
            header = stub.GetStateHeader(
                pb.StateRequest(schema_hash=schema_hash, requester=requester, min_round=min_round),
                timeout=max(0.001, deadline - time.monotonic()), metadata=md)
        except grpc.RpcError as e:
            raise _refusal(address, "header refused", e) from None
        blobs = _check_header(header, address, min_round, max_bytes)
        total = header.total_bytes
        buf = bytearray(total)
        if total:
            # ranges of whole chunks, at least one chunk each
            chunks = -(-total // header.chunk_bytes)
            n = max(1, min(int(streams), chunks))
            bounds = [min(total, (chunks * i // n) * header.chunk_bytes) for i in range(n)] + [total]
            calls: list = []
            errors: List[BaseException] = []

            def run(lo: int, hi: int) -> None:
                try:
                    _stream_range(stub, header, address, md, buf, lo, hi, deadline, chunk_timeout, calls)
                except BaseException as e:  # noqa: BLE001 - reported below; the others are cancelled
                    errors.append(e)
                    for c in list(calls):
                        c.cancel()

            threads = [threading.Thread(target=run, args=(bounds[i], bounds[i + 1]), daemon=True,
                                        name=f"state-range-{i}") for i in range(n) if bounds[i] < bounds[i + 1]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                first = next((e for e in errors if isinstance(e, StateTransferError)
                              and "CANCELLED" not in str(e)), errors[0])
                if isinstance(first, StateTransferError):
                    raise first
                raise StateTransferError(f"state transfer from {address}: {type(first).__name__}: {first}")
        got = state_hash(buf)
        if got != header.state_hash:
            raise StateTransferError(f"state transfer from {address}: hash mismatch: received bytes hash to "
                                     f"{_short(got)}, the header says {_short(header.state_hash)}")
        return StateSnapshot(header.round, bytes(buf), header.meta_json or "{}", blobs, got)
    finally:
        channel.close()


def ping(address: str, schema_hash: str = "", token: str = "", tls=None, timeout: float = 5.0) -> Tuple[str, int, str]:
    """A peer's (peer_id, round, state_hash); StateTransferError when it refuses or is unreachable."""
    channel = make_channel(address, tls, MAX_MESSAGE_BYTES)
    try:
        r = pb_grpc.PeerStub(channel).Ping(pb.PingRequest(schema_hash=schema_hash), timeout=timeout,
                                           metadata=auth_metadata(token))
        return r.peer_id, r.round, r.state_hash
    except grpc.RpcError as e:
        raise _refusal(address, "ping refused", e) from None
    finally:
        channel.close()
