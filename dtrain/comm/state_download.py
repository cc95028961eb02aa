"""State download: a joiner or healer fetches a donor's global state over the ``Peer`` service.

:func:`fetch_state` gets the header, streams the chunks (``streams`` byte
ranges in parallel), checks every chunk's offset and size, the total length
and the hash, and raises :class:`StateTransferError` (one line, with the gRPC
code where there is one) on any refusal, mismatch, truncation or stall (no
chunk within ``chunk_timeout``). The serving side is
:mod:`dtrain.comm.peer_service`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import List, Optional, Tuple

import grpc

from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import auth_metadata, make_channel
from ..wire.snapshot import (
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    BlobMeta,
    StateSnapshot,
    short_hash,
    state_hash,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StateTransferError(RuntimeError):
    """A state transfer failed; ``code`` is the gRPC status code when a peer refused."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


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
            raise bad(
                f"tensor {t.name!r} [{t.offset}, {t.offset + t.nbytes}) lies outside the {h.total_bytes}-byte state"
            )
        blobs.append(BlobMeta(t.name, t.offset, t.nbytes, t.dtype, tuple(t.shape)))
    if len({b.name for b in blobs}) != len(blobs):
        raise bad("a tensor name appears twice")
    return tuple(blobs)


def _stream_range(
    stub,
    header: pb.StateHeader,
    address: str,
    md,
    buf: bytearray,
    lo: int,
    hi: int,
    deadline: float,
    chunk_timeout: float,
    calls: list,
) -> None:
    """Receive ``[lo, hi)`` of a pinned transfer into ``buf``; StateTransferError on any misstep."""
    call = stub.StreamState(
        pb.StateChunkRequest(transfer_id=header.transfer_id, offset=lo, length=hi - lo),
        timeout=max(0.001, deadline - time.monotonic()),
        metadata=md,
    )
    calls.append(call)
    dog = _Watchdog(chunk_timeout, call.cancel)
    pos = lo
    try:
        for chunk in call:
            dog.kick()
            n = len(chunk.data)
            if chunk.offset != pos:
                raise StateTransferError(
                    f"state transfer from {address}: chunk at offset {chunk.offset}, expected {pos}"
                )
            if n == 0 or n > header.chunk_bytes or pos + n > hi:
                raise StateTransferError(
                    f"state transfer from {address}: chunk of {n} bytes at offset {pos} "
                    f"does not fit (chunk_bytes {header.chunk_bytes}, range end {hi})"
                )
            buf[pos : pos + n] = chunk.data
            pos += n
    except grpc.RpcError as e:
        if dog.fired:
            raise StateTransferError(
                f"state transfer from {address}: stalled: no chunk for {chunk_timeout:g}s "
                f"at offset {pos} of {header.total_bytes}",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        raise _refusal(address, f"stream failed at offset {pos} of {header.total_bytes}", e) from None
    finally:
        dog.stop()
        if pos < hi:
            call.cancel()
    if pos != hi:
        raise StateTransferError(
            f"state transfer from {address}: truncated: the range [{lo}, {hi}) ended at {pos} "
            f"({pos - lo} of {hi - lo} bytes)"
        )


def fetch_state(
    address: str,
    schema_hash: str,
    min_round: int = 0,
    token: str = "",
    tls=None,
    timeout: float = 30.0,
    chunk_timeout: float = 10.0,
    requester: str = "",
    max_bytes: int = 1 << 36,
    streams: int = 4,
) -> StateSnapshot:
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
                timeout=max(0.001, deadline - time.monotonic()),
                metadata=md,
            )
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

            threads = [
                threading.Thread(target=run, args=(bounds[i], bounds[i + 1]), daemon=True, name=f"state-range-{i}")
                for i in range(n)
                if bounds[i] < bounds[i + 1]
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                first = next(
                    (e for e in errors if isinstance(e, StateTransferError) and "CANCELLED" not in str(e)), errors[0]
                )
                if isinstance(first, StateTransferError):
                    raise first
                raise StateTransferError(f"state transfer from {address}: {type(first).__name__}: {first}")
        got = state_hash(buf)
        if got != header.state_hash:
            raise StateTransferError(
                f"state transfer from {address}: hash mismatch: received bytes hash to "
                f"{short_hash(got)}, the header says {short_hash(header.state_hash)}"
            )
        return StateSnapshot(header.round, bytes(buf), header.meta_json or "{}", blobs, got)
    finally:
        channel.close()


def ping(address: str, schema_hash: str = "", token: str = "", tls=None, timeout: float = 5.0) -> Tuple[str, int, str]:
    """A peer's (peer_id, round, state_hash); StateTransferError when it refuses or is unreachable."""
    channel = make_channel(address, tls, MAX_MESSAGE_BYTES)
    try:
        r = pb_grpc.PeerStub(channel).Ping(
            pb.PingRequest(schema_hash=schema_hash), timeout=timeout, metadata=auth_metadata(token)
        )
        return r.peer_id, r.round, r.state_hash
    except grpc.RpcError as e:
        raise _refusal(address, "ping refused", e) from None
    finally:
        channel.close()
