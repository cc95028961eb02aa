"""A global state as bytes: the payload, its named blobs, and its state hash.

A snapshot is one byte string, the **payload**: the state's named blobs laid
end to end (each blob's name, dtype, shape, byte offset and length travel in
the state transfer's header as ``TensorMeta``), plus ``meta_json`` for the
non-tensor state. Its **state hash** is ``sha256(payload).hexdigest()`` (64
lowercase hex digits); round and ``meta_json`` are not part of it. No pickle
anywhere. The size limits of a state transfer chunk live here too, because
both ends of the wire (the donor's service, the joiner's download, the shard
collective) must agree on them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
# a chunk message is its data plus a few bytes of framing; both ends allow that much
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)


def state_hash(payload: Union[bytes, bytearray, memoryview]) -> str:
    """The state hash of a payload: ``sha256(payload)`` as 64 lowercase hex digits."""
    return hashlib.sha256(payload).hexdigest()


def short_hash(h: str) -> str:
    """A hash shortened for messages."""
    return (h[:12] + "...") if len(h) > 12 else (h or "''")


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
                raise ValueError(
                    f"blob {b.name!r} [{b.offset}, {b.offset + b.nbytes}) lies outside the "
                    f"{len(self.payload)}-byte payload"
                )
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
                return self.payload[b.offset : b.offset + b.nbytes]
        raise KeyError(f"no blob named {name!r} in the snapshot of round {self.round}")

    def named_blobs(self) -> List[Tuple[str, bytes]]:
        return [(b.name, self.payload[b.offset : b.offset + b.nbytes]) for b in self.blobs]
