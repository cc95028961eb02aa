"""ShardChunk bytes on the wire without copying the payload through protobuf.

A ``ShardChunk`` is a small header (quorum id, round, op, phase, shard,
sender, codec, numel, total_bytes, offset) and ``data``, up to 4 MiB of an
encoded shard. Through the generated protobuf code the payload would be copied
four times on the sender (slice, message field, serialisation, gRPC) and three
times on the receiver (gRPC, parse, every ``.data`` access), and on 2 cores
those copies, not the network, bound the collective. Here:

- ``frame(header, data)`` serialises the header fields with protobuf and
  appends field 11 (``data``) by hand: tag ``0x5a``, varint length, the bytes.
  That IS the protobuf encoding of the whole message (a parser reads the
  fields in any order), built with one copy of ``data``, which may be any
  bytes-like view (a slice of the tensor's memory).
- ``parse(raw)`` walks the top-level fields of a received message, keeps the
  last ``data`` field as a ``memoryview`` into ``raw`` (no copy), and parses
  everything else with protobuf. Bytes that are not a valid ShardChunk raise
  :class:`MalformedChunk`.

Both ends stay wire-compatible with any protobuf implementation of
``ShardChunk``.
"""

from __future__ import annotations

from typing import Tuple

from ..v1 import dtrain_pb2 as pb
from ..wire import varint

DATA_FIELD = 11
_DATA_TAG = bytes([DATA_FIELD << 3 | 2])  # field 11, wire type 2 (length-delimited): 0x5a
GRPC_FRAME_BYTES = 5  # the gRPC message prefix: 1 flag byte + 4 length bytes


class MalformedChunk(ValueError):
    """Bytes that do not parse as a ShardChunk."""


def frame(header: pb.ShardChunk, data) -> bytes:
    """The serialised ShardChunk ``header`` with ``data`` (bytes-like) as its payload."""
    view = memoryview(data).cast("B")
    if not view.nbytes:  # proto3 leaves a default (empty) field out
        return header.SerializeToString()
    return b"".join((header.SerializeToString(), _DATA_TAG, varint.encode(view.nbytes), view))


class WireChunk:
    """A received ShardChunk: the header fields as attributes, ``data`` a memoryview into the frame."""

    __slots__ = (
        "quorum_id",
        "round",
        "op",
        "phase",
        "shard",
        "sender",
        "codec",
        "numel",
        "total_bytes",
        "offset",
        "data",
        "wire_bytes",
    )

    def __init__(self, header: pb.ShardChunk, data: memoryview, wire_bytes: int):
        self.quorum_id, self.round, self.op = header.quorum_id, header.round, header.op
        self.phase, self.shard, self.sender = header.phase, header.shard, header.sender
        self.codec, self.numel, self.total_bytes = header.codec, header.numel, header.total_bytes
        self.offset, self.data, self.wire_bytes = header.offset, data, wire_bytes


def _read_varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    try:
        return varint.decode(buf, pos)
    except varint.VarintError as e:
        raise MalformedChunk(str(e)) from None


def parse(raw: bytes) -> WireChunk:
    """A ShardChunk from its serialised bytes; MalformedChunk if they are not one."""
    buf = memoryview(raw)
    pos, data_span, rest = 0, (0, 0), []
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise MalformedChunk("field number 0")
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if field == DATA_FIELD:
                if pos + n > len(buf):
                    raise MalformedChunk("data field runs past the end")
                data_span = (pos, pos + n)
                pos += n
                continue
            pos += n
        else:
            raise MalformedChunk(f"wire type {wire}")
        if pos > len(buf):
            raise MalformedChunk("field runs past the end")
        rest.append(buf[start:pos])
    try:
        header = pb.ShardChunk.FromString(b"".join(rest))
    except Exception as e:  # noqa: BLE001 - the protobuf runtime's DecodeError and friends
        raise MalformedChunk(f"header does not parse: {type(e).__name__}") from None
    return WireChunk(header, buf[data_span[0] : data_span[1]], len(raw) + GRPC_FRAME_BYTES)
