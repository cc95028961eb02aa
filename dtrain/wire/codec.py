"""The codec interface: how a flat fp32 pseudo-gradient becomes bytes on the wire.

A codec maps a 1-D float32 tensor of ``numel`` values to ``encoded_size(numel)``
bytes and back. Decoding validates: a payload of the wrong length, or one that
decodes to non-finite values, raises :class:`CodecError` (the sender is then
reported and excluded). Encoding is deterministic: the same input gives the
same bytes on every machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import torch

# what ``decode`` reads: received bytes, a receive buffer handed over (bytearray), or a view (memoryview)
BytesLike = Union[bytes, bytearray, memoryview]


class CodecError(ValueError):
    """A payload that cannot be decoded (wrong length, bad scale, non-finite values)."""


class Codec(ABC):
    name: str = ""

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Bytes of the encoding of ``numel`` values."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> bytes:
        """Encode a 1-D float32 CPU tensor."""

    def encode_view(self, x: torch.Tensor):
        """``encode(x)`` as any bytes-like object; it may share memory with ``x`` (fp32 does: no copy),
        so it is valid only while ``x`` is unchanged."""
        return self.encode(x)

    @abstractmethod
    def decode(self, payload: BytesLike, numel: int) -> torch.Tensor:
        """Decode to a 1-D float32 CPU tensor of ``numel`` values; CodecError if invalid.

        The result is new memory, except that a codec may keep the memory of a WRITABLE payload
        (a bytearray the caller hands over); bytes always give a new tensor."""

    @property
    def lossless(self) -> bool:
        return False
