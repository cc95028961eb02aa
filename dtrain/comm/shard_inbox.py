"""ShardInbox: the receiving side of the ``grpc`` outer collective (``Peer.PushShard``).

A collective is named by its key ``(quorum_id, round, op)``. Before it sends
anything, the local collective **opens** the key with the members (ring order)
and the slots it expects: ``(phase, shard, sender) -> numel``. Every chunk
carries ``(quorum_id, round, op, phase, shard, sender)`` plus ``codec``,
``numel``, ``total_bytes`` and ``offset``; the inbox copies ``data`` to
``[offset, offset + len(data))`` of its slot's buffer. A slot is complete when
its received byte ranges (never overlapping, all inside ``total_bytes``) add
up to ``total_bytes``; it is then decoded at once (``codec.decode``) and the
encoded bytes are dropped.

Checks on every chunk, in order:

- key closed (finished or failed here): FAILED_PRECONDITION, so late senders
  stop at once;
- key not open yet: the chunk is **buffered** while the early buffer
  (``max_early_bytes``, ``max_early_groups``) has room, else the stream waits up
  to ``early_wait_s`` (and its own deadline) for the key to open, then gets
  FAILED_PRECONDITION. Buffered chunks are replayed through the checks below
  when the key opens and are dropped after ``early_ttl_s``;
- sender not a member of the group, or this peer itself: PERMISSION_DENIED
  (the collective is not affected: anyone can name any group);
- the group already failed here: FAILED_PRECONDITION;
- from a member, any of: a slot it should not send (phase, shard), another
  codec, ``numel`` != the expected shard length, ``total_bytes`` !=
  ``codec.encoded_size(numel)``, an empty or over-long chunk, a range outside
  ``total_bytes`` or overlapping one already received, or a payload that
  ``codec.decode`` refuses (:class:`CodecError`: wrong length, non-finite
  values): INVALID_ARGUMENT to the sender, and the group fails with
  ``CollectiveError(culprit=sender)``: the waiting collective raises it.

Memory per peer is bounded: ``open`` refuses a group whose expected encoded
bytes would push the open groups over ``max_bytes``, and the early buffer holds
at most ``max_early_bytes``. Slot buffers are allocated on their first chunk.

Byte counting: every chunk from a member of an open group (replayed early
chunks included) counts ``chunk.ByteSize() + 5`` (the gRPC length-prefix
frame) towards the group's ``bytes_recv``; HTTP/2 and TCP framing are not
counted.

Trust: ``sender`` is what the chunk says. With per-peer identities (mutual
TLS certificates or identity tokens) the Peer service refuses a stream whose
chunks name anyone but the caller before it reaches this inbox
(``dtrain.wire.auth.IdentityGuard``); with the shared token, a token holder
naming another member is not detected here.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import grpc
import torch

from ..v1 import dtrain_pb2 as pb
from ..wire import varint
from ..wire.codec import BytesLike, Codec, CodecError
from ..wire.snapshot import MAX_CHUNK_BYTES
from .collective import CollectiveError, evidence_of
from .shard_wire import GRPC_FRAME_BYTES, WireChunk

log = logging.getLogger("dtrain.comm")

Key = Tuple[int, int, str]  # (quorum_id, round, op)
SlotId = Tuple[int, int, str]  # (phase, shard, sender)
Refusal = Tuple[grpc.StatusCode, str]


def _field_len(value) -> int:
    """Serialized size of one proto3 field with a field number below 16 (one-byte tag);
    default values are not sent."""
    if isinstance(value, (bytes, str)):
        n = len(value.encode() if isinstance(value, str) else value)
        return 1 + varint.size(n) + n if n else 0
    return 1 + varint.size(value) if value else 0


def wire_size(chunk) -> int:
    """Bytes a chunk occupies in the gRPC stream: the serialized message plus its 5-byte frame.
    A received :class:`WireChunk` knows it; for a ``pb.ShardChunk`` it is computed from the fields
    (equal to ``ByteSize()``, which would serialize the data to count it)."""
    if isinstance(chunk, WireChunk):
        return chunk.wire_bytes
    fields = (
        chunk.quorum_id,
        chunk.round,
        chunk.op,
        chunk.phase,
        chunk.shard,
        chunk.sender,
        chunk.codec,
        chunk.numel,
        chunk.total_bytes,
        chunk.offset,
        chunk.data,
    )
    return sum(_field_len(v) for v in fields) + GRPC_FRAME_BYTES


@dataclass
class _Slot:
    numel: int
    total: int
    buf: Optional[bytearray] = None
    starts: List[int] = field(default_factory=list)  # received ranges, merged, sorted
    ends: List[int] = field(default_factory=list)
    got: int = 0
    complete: bool = False  # all bytes in (decoding or decoded)
    value: Optional[torch.Tensor] = None


@dataclass
class _Group:
    key: Key
    me: str
    members: Tuple[str, ...]
    codec: Codec
    slots: Dict[SlotId, _Slot]
    reserved: int
    error: Optional[CollectiveError] = None
    second_hand: Optional[CollectiveError] = None  # raised at ``second_hand_at`` unless ``error`` comes first
    second_hand_at: float = 0.0
    bytes_recv: int = 0


def _key_str(key: Key) -> str:
    return f"(quorum {key[0]}, round {key[1]}, op {key[2]!r})"


class ShardInbox:
    """Receives, checks and assembles the shard chunks pushed to this peer (see the module docstring)."""

    def __init__(
        self,
        max_bytes: int = 4 << 30,
        max_early_bytes: int = 16 << 20,
        max_early_groups: int = 8,
        early_wait_s: float = 5.0,
        early_ttl_s: float = 60.0,
        remember_closed: int = 256,
    ):
        self.max_bytes, self.max_early_bytes, self.max_early_groups = max_bytes, max_early_bytes, max_early_groups
        self.early_wait_s, self.early_ttl_s, self.remember_closed = early_wait_s, early_ttl_s, remember_closed
        self._cond = threading.Condition()
        self._groups: Dict[Key, _Group] = {}
        self._closed: "OrderedDict[Key, str]" = OrderedDict()  # key -> how it ended
        self._early: "OrderedDict[Key, List]" = OrderedDict()  # key -> [first seen, [chunks]]
        self._early_bytes = 0
        self._reserved = 0

    # ------------------------------------------------------------ the collective's side

    def open(self, key: Key, me: str, members: Sequence[str], codec: Codec, expected: Dict[SlotId, int]) -> None:
        """Expect ``expected`` slots for ``key``; replays chunks that arrived early. CollectiveError if impossible."""
        slots = {sid: _Slot(numel, codec.encoded_size(numel)) for sid, numel in expected.items()}
        reserve = sum(s.total for s in slots.values())
        with self._cond:
            if key in self._groups:
                raise CollectiveError(f"collective {_key_str(key)} is already running on this peer")
            if self._reserved + reserve > self.max_bytes:
                raise CollectiveError(
                    f"collective {_key_str(key)} needs {reserve} bytes of receive buffers; "
                    f"{self._reserved} of the inbox limit {self.max_bytes} are in use"
                )
            g = _Group(key, me, tuple(members), codec, slots, reserve)
            self._groups[key] = g
            self._reserved += reserve
            self._closed.pop(key, None)
            early = self._early.pop(key, None)
            chunks = early[1] if early else []
            self._early_bytes -= sum(wire_size(c) for c in chunks)
            empty = [(sid, s) for sid, s in slots.items() if s.total == 0]
            for _, s in empty:
                s.complete = True
            self._cond.notify_all()
        for sid, s in empty:  # nothing to receive: decode the empty payload now
            self._decode(g, s, sid[2], b"")
        for chunk in chunks:
            refusal = self._take(g, chunk)
            if refusal is not None:
                log.info("dropped an early chunk for %s from %r: %s", _key_str(key), chunk.sender, refusal[1])

    def wait(self, key: Key, phase: int, deadline: float) -> Dict[Tuple[int, str], torch.Tensor]:
        """The decoded slots of ``phase`` as ``{(shard, sender): tensor}`` once all arrived; else CollectiveError."""
        with self._cond:
            g = self._groups[key]
            while True:
                if g.error is not None:
                    raise g.error
                now = time.monotonic()
                if g.second_hand is not None and now >= g.second_hand_at:
                    raise g.second_hand
                mine = {sid: s for sid, s in g.slots.items() if sid[0] == phase}
                decoded = {(sid[1], sid[2]): s.value for sid, s in mine.items() if s.value is not None}
                if len(decoded) == len(mine):
                    return decoded
                if now >= deadline:
                    missing = [sid for sid, s in mine.items() if s.value is None]
                    what = ", ".join(f"{sid[2]} ({mine[sid].got}/{mine[sid].total} bytes)" for sid in missing)
                    raise CollectiveError(
                        f"collective {_key_str(key)}: deadline passed in phase {phase}, missing the shards of {what}"
                    )
                until = deadline if g.second_hand is None else min(deadline, g.second_hand_at)
                self._cond.wait(until - now)

    def fail(self, key: Key, error: CollectiveError, grace_s: float = 0.0) -> None:
        """Fail an open group; its waiters raise ``error`` (the first one wins).

        With ``grace_s`` > 0 the error is second-hand (another member gave up): waiters raise it only after
        ``grace_s``, so that a payload already on its way can still be checked and its sender named.
        """
        with self._cond:
            g = self._groups.get(key)
            if g is None or g.error is not None:
                return
            if grace_s <= 0:
                g.error = error
            elif g.second_hand is None:
                g.second_hand, g.second_hand_at = error, time.monotonic() + grace_s
            self._cond.notify_all()

    def bytes_received(self, key: Key) -> int:
        with self._cond:
            g = self._groups.get(key)
            return g.bytes_recv if g is not None else 0

    def close(self, key: Key, outcome: str = "finished") -> int:
        """Drop a group (later chunks get FAILED_PRECONDITION); returns the bytes it received."""
        with self._cond:
            g = self._groups.pop(key, None)
            self._closed[key] = outcome
            self._closed.move_to_end(key)
            while len(self._closed) > self.remember_closed:
                self._closed.popitem(last=False)
            self._cond.notify_all()
            if g is None:
                return 0
            self._reserved -= g.reserved
            return g.bytes_recv

    def open_groups(self) -> List[Key]:
        with self._cond:
            return list(self._groups)

    def early_bytes(self) -> int:
        with self._cond:
            return self._early_bytes

    # ------------------------------------------------------------ the RPC side

    def push(self, request_iterator, context) -> pb.PushAck:
        """The body of ``Peer.PushShard``: take every chunk of the stream or abort it with a status."""
        accepted = 0
        it = iter(request_iterator)
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                break
            except Exception:  # the sender went away or the deadline passed: nobody to answer
                return pb.PushAck(bytes=accepted)
            refusal = self._receive(chunk, context.time_remaining())
            if refusal is not None:
                context.abort(*refusal)
            accepted += len(chunk.data)
        return pb.PushAck(bytes=accepted)

    def _receive(self, chunk: pb.ShardChunk, time_left: Optional[float]) -> Optional[Refusal]:
        key = (chunk.quorum_id, chunk.round, chunk.op)
        with self._cond:
            self._purge_early(time.monotonic())
            g = self._groups.get(key)
            if g is None:
                if key in self._closed:
                    return self._refuse(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        chunk,
                        f"collective {_key_str(key)} is over on this peer ({self._closed[key]})",
                    )
                if self._buffer_early(key, chunk):
                    return None
                wait = self.early_wait_s if time_left is None else max(0.0, min(self.early_wait_s, time_left))
                self._cond.wait_for(lambda: key in self._groups or key in self._closed, timeout=wait)
                g = self._groups.get(key)
                if g is None:
                    return self._refuse(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        chunk,
                        f"this peer expects no collective {_key_str(key)} (waited {wait:.1f}s; early buffer full)",
                    )
        return self._take(g, chunk)

    def _buffer_early(self, key: Key, chunk: pb.ShardChunk) -> bool:
        size = wire_size(chunk)
        if self._early_bytes + size > self.max_early_bytes or len(chunk.data) > MAX_CHUNK_BYTES:
            return False
        entry = self._early.get(key)
        if entry is None:
            if len(self._early) >= self.max_early_groups:
                return False
            entry = self._early[key] = [time.monotonic(), []]
        entry[1].append(chunk)
        self._early_bytes += size
        return True

    def _purge_early(self, now: float) -> None:
        while self._early:
            key, (first, chunks) = next(iter(self._early.items()))
            if now - first <= self.early_ttl_s:
                return
            del self._early[key]
            self._early_bytes -= sum(wire_size(c) for c in chunks)
            log.info("dropped %d early chunks for %s: the collective never opened here", len(chunks), _key_str(key))

    @staticmethod
    def _refuse(code: grpc.StatusCode, chunk: pb.ShardChunk, msg: str) -> Refusal:
        log.info("refused a shard chunk from %r: %s: %s", chunk.sender, code.name, msg)
        return code, msg

    def _take(self, g: _Group, chunk: pb.ShardChunk) -> Optional[Refusal]:
        """Check one chunk against an open group and store it; decodes a slot it completes."""
        sender = chunk.sender
        with self._cond:
            if self._groups.get(g.key) is not g:
                return self._refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    chunk,
                    f"collective {_key_str(g.key)} is over on this peer ({self._closed.get(g.key, 'closed')})",
                )
            if sender not in g.members or sender == g.me:
                return self._refuse(
                    grpc.StatusCode.PERMISSION_DENIED,
                    chunk,
                    f"{sender!r} is not a member of collective {_key_str(g.key)} sending to {g.me!r}",
                )
            if g.error is not None:
                return self._refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    chunk,
                    f"collective {_key_str(g.key)} already failed on this peer: {g.error}",
                )
            g.bytes_recv += wire_size(chunk)
            slot = g.slots.get((chunk.phase, chunk.shard, sender))
            if slot is None:
                return self._fault(
                    g,
                    sender,
                    f"phase {chunk.phase} shard {chunk.shard} is not a shard it should send here",
                    chunk.data,
                )
            why = self._check(g, slot, chunk)
            if why is not None:
                return self._fault(g, sender, why, chunk.data)
            o, n = chunk.offset, len(chunk.data)
            if slot.buf is None:
                slot.buf = bytearray(slot.total)
            slot.buf[o : o + n] = chunk.data
            self._add_range(slot, o, o + n)
            slot.got += n
            if slot.got < slot.total:
                return None
            slot.complete = True
            payload, slot.buf = slot.buf, None  # codecs read bytes-like buffers: no copy
        return self._decode(g, slot, sender, payload)

    @staticmethod
    def _check(g: _Group, slot: _Slot, chunk: pb.ShardChunk) -> Optional[str]:
        if chunk.codec != g.codec.name:
            return f"codec {chunk.codec!r}, expected {g.codec.name!r}"
        if chunk.numel != slot.numel:
            return f"numel {chunk.numel}, expected {slot.numel} for shard {chunk.shard}"
        if chunk.total_bytes != slot.total:
            return f"total_bytes {chunk.total_bytes}, expected {slot.total} ({g.codec.name} of {slot.numel} values)"
        o, n = chunk.offset, len(chunk.data)
        if n == 0 or n > MAX_CHUNK_BYTES:
            return f"a chunk of {n} bytes (allowed: 1..{MAX_CHUNK_BYTES})"
        if o + n > slot.total:
            return f"bytes [{o}, {o + n}) lie outside the {slot.total}-byte shard"
        if slot.complete:
            return f"bytes [{o}, {o + n}) arrived after the shard was complete"
        i = bisect.bisect_right(slot.starts, o)
        if (i > 0 and slot.ends[i - 1] > o) or (i < len(slot.starts) and slot.starts[i] < o + n):
            return f"bytes [{o}, {o + n}) overlap bytes already received"
        return None

    @staticmethod
    def _add_range(slot: _Slot, start: int, end: int) -> None:
        i = bisect.bisect_right(slot.starts, start)
        if i > 0 and slot.ends[i - 1] == start:  # extend the range before
            i -= 1
            slot.ends[i] = end
        else:
            slot.starts.insert(i, start)
            slot.ends.insert(i, end)
        if i + 1 < len(slot.starts) and slot.starts[i + 1] == slot.ends[i]:  # join the range after
            slot.ends[i] = slot.ends.pop(i + 1)
            slot.starts.pop(i + 1)

    def _fault(self, g: _Group, sender: str, why: str, data: BytesLike = b"") -> Refusal:
        """Fail the group naming ``sender``, with the hash of the bytes judged bad (``data``) as evidence
        (call with the lock held); the refusal for its stream."""
        msg = f"invalid shard payload from {sender!r} in collective {_key_str(g.key)}: {why}"
        log.warning("%s", msg)
        if g.error is None:
            g.error = CollectiveError(msg, culprit=sender, evidence=evidence_of(data))
            self._cond.notify_all()
        return grpc.StatusCode.INVALID_ARGUMENT, msg

    def _decode(self, g: _Group, slot: _Slot, sender: str, payload: BytesLike) -> Optional[Refusal]:
        """Decode a complete slot outside the lock; a refused payload fails the group naming its sender."""
        try:
            value = g.codec.decode(payload, slot.numel)
            why = None
            if value.dtype != torch.float32 or value.shape != (slot.numel,):
                why = f"decoded to {value.dtype} {tuple(value.shape)}, not float32 ({slot.numel},)"
        except CodecError as e:
            why = f"{g.codec.name} payload refused: {e}"
        except Exception as e:  # a codec bug, not the sender's fault
            with self._cond:
                if g.error is None:
                    g.error = CollectiveError(f"decoding a shard from {sender!r} failed: {type(e).__name__}: {e}")
                self._cond.notify_all()
            return grpc.StatusCode.INTERNAL, f"decoding failed on the receiver: {type(e).__name__}"
        with self._cond:
            if why is not None:
                return self._fault(g, sender, why, payload)
            slot.value = value
            self._cond.notify_all()
        return None
