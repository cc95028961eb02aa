"""The ``Peer`` gRPC service: a donor serves its global state; the grpc collective's shards arrive here.

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
disjoint ranges over several streams or from several donors. ``PushShard``
streams go to the shard inbox of the ``grpc`` outer collective. The payload
format is :mod:`dtrain.wire.snapshot`; the receiving side is
:mod:`dtrain.comm.state_download`.

Identity (rules in :mod:`dtrain.wire.auth`; ``serve_peer`` sets the
servicer's ``guard`` from its token and TLS settings). Where identities are
bound (mutual TLS: ``tls.client_ca``; identity tokens: this peer's own token is
one) every RPC is checked before it does anything:

- ``Ping`` (names no peer): any authenticated caller, tools included;
- ``GetStateHeader``: ``requester`` must be the caller's own peer id, and the
  transfer it pins belongs to that identity;
- ``StreamState``: only the identity that got the transfer's header may read
  it (a transfer id seen by someone else is no key to the state);
- ``PushShard``: every chunk's ``sender`` must be the caller's own peer id;
  the stream stops at the first chunk that names another one, and that chunk
  and the rest never reach the shard inbox (the collective is not disturbed,
  and no member is blamed for what someone else sent in its name).

A refusal is PERMISSION_DENIED with one WARNING line. Revocation is the
coordinator's (a revoked peer is in no quorum, so its shards are refused as a
non-member's); ``serve_peer(revoked=...)`` refuses revoked ids here too.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import grpc

from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import (
    PEER,
    BlockingTokenInterceptor,
    Identity,
    IdentityGuard,
    TokenPolicy,
    channel_options,
    server_credentials,
)
from ..wire.snapshot import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    StateSnapshot,
    short_hash,
)
from . import shard_wire

log = logging.getLogger("dtrain.comm")


@dataclass
class _Transfer:
    snapshot: StateSnapshot
    used: float  # monotonic time of the last use
    owner: Optional[Identity]  # who got its header, where identities are bound


class PeerServicer(pb_grpc.PeerServicer):
    """Serves this peer's current snapshot (``set_snapshot``) to joiners and healers, and hands
    ``PushShard`` streams to ``inbox`` (a ``dtrain.comm.shard_inbox.ShardInbox``) when given."""

    def __init__(
        self,
        schema_hash: str,
        peer_id: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        transfer_ttl_s: float = 60.0,
        min_round_wait_s: float = 5.0,
        max_transfers: int = 64,
        inbox=None,
    ):
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} is not allowed: 1..{MAX_CHUNK_BYTES}")
        self.schema_hash, self.peer_id, self.chunk_bytes = schema_hash, peer_id, int(chunk_bytes)
        self.transfer_ttl_s, self.min_round_wait_s, self.max_transfers = transfer_ttl_s, min_round_wait_s, max_transfers
        self._cond = threading.Condition()
        self._snapshot: Optional[StateSnapshot] = None
        self._transfers: "OrderedDict[str, _Transfer]" = OrderedDict()
        self.inbox = inbox
        self.guard = IdentityGuard(logger=log)  # serve_peer replaces it: nothing bound by default

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
        for tid in [t for t, x in self._transfers.items() if now - x.used > self.transfer_ttl_s]:
            del self._transfers[tid]
        while len(self._transfers) > self.max_transfers:
            self._transfers.popitem(last=False)

    def _check_schema(self, schema: str, context: grpc.ServicerContext, what: str) -> None:
        if schema != self.schema_hash:
            msg = (
                f"schema hash {short_hash(schema)} differs from this peer's {short_hash(self.schema_hash)}: "
                "the requester runs other code or another model config"
            )
            log.info("refused %s: %s", what, msg)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)

    def _bind(self, context: grpc.ServicerContext, method: str, claimed: Optional[str]) -> Optional[Identity]:
        """The caller's identity; PERMISSION_DENIED (one log line, by the guard) when it may not make
        this call as peer ``claimed`` (None: a call that names no peer)."""
        ident, why = self.guard.authorize(context, method, claimed)
        if why:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return ident

    # -- RPCs
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        self._bind(context, "Ping", None)
        if request.schema_hash:
            self._check_schema(request.schema_hash, context, "Ping")
        snap = self.snapshot
        if snap is None:
            return pb.PingReply(peer_id=self.peer_id)
        return pb.PingReply(peer_id=self.peer_id, round=snap.round, state_hash=snap.state_hash)

    def GetStateHeader(self, request: pb.StateRequest, context: grpc.ServicerContext) -> pb.StateHeader:
        ident = self._bind(context, "GetStateHeader", request.requester)
        owner = ident if self.guard.binding else None
        self._check_schema(request.schema_hash, context, "GetStateHeader")
        wait = self.min_round_wait_s
        left = context.time_remaining()
        if left is not None:
            wait = max(0.0, min(wait, left - 0.05))
        with self._cond:
            self._cond.wait_for(
                lambda: self._snapshot is not None and self._snapshot.round >= request.min_round, timeout=wait
            )
            snap = self._snapshot
            if snap is None or snap.round < request.min_round:
                held = "no state" if snap is None else f"round {snap.round}"
                msg = f"holds {held}, older than the requested round {request.min_round} (waited {wait:.1f}s)"
                log.info("refused GetStateHeader from %r: %s", request.requester, msg)
                context.abort(grpc.StatusCode.ABORTED, msg)
            now = time.monotonic()
            self._purge(now)
            tid = secrets.token_hex(16)
            self._transfers[tid] = _Transfer(snap, now, owner)
            self._purge(now)
        log.info("transfer %s: round %d, %d bytes to %r", tid[:8], snap.round, len(snap.payload), request.requester)
        return pb.StateHeader(
            transfer_id=tid,
            round=snap.round,
            state_hash=snap.state_hash,
            total_bytes=len(snap.payload),
            chunk_bytes=self.chunk_bytes,
            meta_json=snap.meta_json,
            tensors=[
                pb.TensorMeta(name=b.name, dtype=b.dtype, shape=list(b.shape), offset=b.offset, nbytes=b.nbytes)
                for b in snap.blobs
            ],
        )

    def _pinned(self, transfer_id: str) -> Optional[_Transfer]:
        with self._cond:
            now = time.monotonic()
            self._purge(now)
            entry = self._transfers.get(transfer_id)
            if entry is None:
                return None
            entry.used = now
            self._transfers.move_to_end(transfer_id)
            return entry

    def StreamState(self, request: pb.StateChunkRequest, context: grpc.ServicerContext) -> Iterable[pb.StateChunk]:
        ident = self._bind(context, "StreamState", None)
        pinned = self._pinned(request.transfer_id)
        if pinned is not None and pinned.owner is not None and pinned.owner != ident:
            claimed = pinned.owner.name if pinned.owner.kind == PEER else None
            why = f"transfer {request.transfer_id[:8]} was opened by {pinned.owner}"
            context.abort(grpc.StatusCode.PERMISSION_DENIED, self.guard.refuse("StreamState", ident, claimed, why))
        snap = pinned.snapshot if pinned is not None else None
        if snap is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown or expired transfer id {request.transfer_id[:16]!r}: ask for a header again",
            )
        total = len(snap.payload)
        start = request.offset
        end = total if request.length == 0 else start + request.length
        if start > total or end > total:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"range [{start}, {end}) is outside the {total}-byte state")
        view = memoryview(snap.payload)
        pos = start
        while pos < end:
            if not context.is_active():
                return
            n = min(self.chunk_bytes, end - pos)
            yield pb.StateChunk(offset=pos, data=bytes(view[pos : pos + n]))
            pos += n
            self._pinned(request.transfer_id)  # keeps a long transfer alive

    def PushShard(self, request_iterator, context: grpc.ServicerContext) -> pb.PushAck:
        ident = self._bind(context, "PushShard", None)
        if self.inbox is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this peer runs no grpc outer collective (no shard inbox)"
            )
        if ident is None or (not self.guard.binding and not self.guard.revoked):
            return self.inbox.push(request_iterator, context)
        refused: List[str] = []

        def own_chunks():
            """The stream up to the first chunk that names another sender than the caller."""
            for chunk in request_iterator:
                why = self.guard.claim_refusal(ident, chunk.sender)
                if why:
                    refused.append(self.guard.refuse("PushShard", ident, chunk.sender, why))
                    return
                yield chunk

        ack = self.inbox.push(own_chunks(), context)
        if refused:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refused[0])
        return ack


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


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
            getattr(servicer, m.name), request_deserializer=parse, response_serializer=reply.SerializeToString
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # grpcio >= 1.62 has it; pyright's bundled typeshed stubs for grpcio do not list it on grpc.Server
    server.add_registered_method_handlers(service.full_name, handlers)  # pyright: ignore[reportAttributeAccessIssue]


def _add_health(server: grpc.Server) -> None:
    """The standard gRPC health service (no token needed), SERVING for the Peer service:
    what docker healthchecks and load balancers ask."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    for name in ("", "dtrain.v1.Peer"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def serve_peer(
    servicer: PeerServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str = "",
    tls=None,
    max_workers: int = 8,
    revoked: Iterable[str] = (),
) -> Tuple[grpc.Server, int]:
    """Start a thread-pool gRPC server for ``servicer``; returns (server, bound port).

    ``token`` is this peer's own: a shared token is what callers must send; an identity token makes
    the service accept identity tokens of the same cluster key (and bind calls to them). ``tls`` with
    ``client_ca``: mutual TLS, calls bound to the certificate's identity. Sets ``servicer.guard``."""
    tokens = TokenPolicy.for_server(token)
    mutual = tls is not None and tls.server_enabled and bool(tls.client_ca)
    servicer.guard = IdentityGuard(tokens, mutual_tls=mutual, revoked=revoked, logger=log)
    if tokens.mode == TokenPolicy.IDENTITY:
        own = tokens.identity_of(token)
        if own is not None and (own.kind, own.name) != (PEER, servicer.peer_id) and servicer.peer_id:
            log.warning("this peer's token names %s, not peer %r: the coordinator refuses it", own, servicer.peer_id)
    interceptors: List[grpc.ServerInterceptor] = [BlockingTokenInterceptor(tokens)] if tokens.enabled else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="peer-rpc"),
        interceptors=interceptors,
        options=channel_options(MAX_MESSAGE_BYTES),
    )
    add_peer_service(servicer, server)
    _add_health(server)
    bind = f"{host}:{port}"
    creds = server_credentials(tls) if tls is not None else None
    bound = server.add_secure_port(bind, creds) if creds is not None else server.add_insecure_port(bind)
    if not bound:
        raise OSError(f"cannot bind the Peer service to {bind}")
    server.start()
    return server, bound
