"""Protocol-buffer varints: unsigned integers in 7-bit groups, least significant first,
the high bit of each byte set while more bytes follow."""

from __future__ import annotations

from typing import Tuple


class VarintError(ValueError):
    """Bytes that do not hold a varint (truncated, or longer than 64 bits)."""


def encode(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def decode(buf: memoryview, pos: int) -> Tuple[int, int]:
    """The varint starting at ``buf[pos]``: (value, position after it)."""
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise VarintError("truncated or over-long varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def size(value: int) -> int:
    """Bytes of ``encode(value)``, without building them."""
    n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n
