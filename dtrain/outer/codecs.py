"""Wire codecs for flat float32 pseudo-gradients: fp32, fp16, bf16, int8, int4.

Every codec maps a 1-D float32 tensor ``x`` of ``n`` values to exactly
``encoded_size(n)`` bytes, with no header (the receiver knows ``n`` and the codec
from the round's configuration). All multi-byte fields are little-endian.
Encoding is elementwise or uses max-reductions only, so the bytes do not
depend on the thread count or the machine. ``x̂ = decode(encode(x))``.

Float codecs (one value after another, no blocks):

- ``fp32``: IEEE binary32, 4 bytes/value. Lossless: x̂ = x bit for bit.
- ``fp16``: IEEE binary16, 2 bytes/value, round to nearest even.
  |x - x̂| <= max(2^-11 |x|, 2^-25) (relative for normal |x| >= 2^-14, absolute
  half a subnormal step below). |x| >= 65520 would become inf: CodecError.
- ``bf16``: bfloat16 (the top 16 bits of binary32), 2 bytes/value, round to
  nearest even. |x - x̂| <= max(2^-8 |x|, 2^-134).

Block absmax codecs ``int8`` (q_max = 127) and ``int4`` (q_max = 7). The values
are cut into blocks of ``block_size`` (the last one may be shorter); for a block
with absmax ``a``:

    s  = a / q_max                     (float32)
    s' = max(floor16(s), 2^-126) if a > 2^-127 else 0   (the transmitted scale)
    q  = clamp(round_half_even(x / s'), -q_max, q_max)
    x̂  = q * s'                        (exact in float32)

``floor16`` rounds down onto the scale format ``uf16``: an unsigned 16-bit float
made of bits 30..15 of the binary32 pattern (8 exponent bits with bias 127, 8
mantissa bits, no sign bit; decode: ``float32 bits = u16 << 15``). It has
float32's range (1e-38 .. 3e38), so blocks of any magnitude keep full
resolution, and one more mantissa bit than bf16 because a scale needs no sign.
That extra bit matters: rounding the scale *down* loses at most 2^-8 of it, so
a / s' < q_max + 1/2 and the largest value still lands on ±q_max, never
clamped (for a >= q_max 2^-126; smaller blocks use s' = 2^-126). Hence, per
element,

    |x - x̂| <= s' / 2 <= max(a / q_max, 2^-126) / 2    (+ a 2^-16 relative float slack)

and re-encoding x̂ reproduces the same bytes (the grid is a fixed point), which
lets a sender put its vector on the codec grid once (error feedback) and have
the collective transmit it without further loss -- provided it is cut into the
same blocks (the whole vector, or slices starting at multiples of block_size).
Blocks of zeros have s' = 0 and decode to exact zeros. Every finite float32 is
accepted. Scale overhead: 2 bytes per block, i.e. 1.6 % of
the int8 payload and 3.1 % of the int4 payload at block_size 128.

Byte layout of int8 / int4 (nb = ceil(n / block_size)):

    [nb x uint16 uf16 scales][codes]
    int8 codes: n x int8 (two's complement, -127..127; -128 is invalid)
    int4 codes: ceil(n / 2) bytes; value 2i in the low nibble, 2i+1 in the high
                nibble, each nibble = q + 8 in 1..15 (0 is invalid); for odd n the
                final high nibble is 0.

    encoded_size: fp32 4n, fp16/bf16 2n, int8 2nb + n, int4 2nb + ceil(n/2).

Decoding raises :class:`CodecError` (one line: codec, what was expected, what
was found) for a payload of the wrong length, a non-finite scale, a scale so
large that q_max * s' overflows, a code outside the valid range, or (float
codecs) a non-finite value. ``encode`` raises CodecError on non-finite input or
on values the format cannot hold (a peer must never send NaN/inf).
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Type

import numpy as np
import torch

from dtrain.wire.codec import Codec, CodecError

from ..config import CODEC_NAMES  # noqa: F401  (re-exported: the codec names, in order)

_MIN_SCALE_U16 = 0x0100  # uf16 pattern of 2^-126 (smallest normal float32)
_INF_SCALE_U16 = 0xFF00  # exponent all ones: inf / NaN
_CHUNK = 1 << 18  # values per encode work chunk (1 MiB of float32)


def _check_input(codec: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{codec}.encode: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu":
        raise ValueError(f"{codec}.encode: expected a 1-D float32 CPU tensor, got {x.dim()}-D {x.dtype} on {x.device}")
    return x.detach().contiguous()


def _absmax(x: torch.Tensor) -> float:
    """max |x| of a non-empty tensor; NaN if any value is NaN."""
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi)) if not (torch.isnan(lo) or torch.isnan(hi)) else float("nan")


def _check_length(codec: str, payload, numel: int, expected: int) -> memoryview:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{codec}.decode: numel must be an int >= 0, got {numel!r}")
    try:
        view = memoryview(payload).cast("B")
    except TypeError:
        raise CodecError(f"{codec} payload: expected a bytes-like object, got {type(payload).__name__}") from None
    if view.nbytes != expected:
        raise CodecError(f"{codec} payload: expected {expected} bytes for {numel} values, got {view.nbytes}")
    return view


def _non_finite(codec: str, x: torch.Tensor) -> CodecError:
    bad = (~torch.isfinite(x)).nonzero()
    i = int(bad[0, 0]) if bad.numel() else -1
    return CodecError(f"{codec}.encode: input must be finite, got {float(x[i])} at index {i}")


class _FloatCodec(Codec):
    """Elementwise conversion to a float format of ``_bytes`` bytes per value."""

    _bytes: int
    _torch_dtype: torch.dtype
    _bits_dtype: torch.dtype  # integer dtype of the same width, to reach the raw bits
    _np_wire: str  # little-endian numpy dtype of the raw bits
    _limit: str  # human description of the largest encodable magnitude

    def encoded_size(self, numel: int) -> int:
        return self._bytes * int(numel)

    def encode(self, x: torch.Tensor) -> bytes:
        return bytes(self.encode_view(x))

    def encode_view(self, x: torch.Tensor) -> memoryview:
        x = _check_input(self.name, x)
        if x.numel() == 0:
            return memoryview(b"")
        a = _absmax(x)
        if not np.isfinite(a):
            raise _non_finite(self.name, x)
        if not np.isfinite(float(torch.tensor(a, dtype=torch.float32).to(self._torch_dtype))):
            raise CodecError(f"{self.name}.encode: max |x| = {a:.6g} overflows {self.name} (limit {self._limit})")
        bits = x.to(self._torch_dtype).view(self._bits_dtype).numpy()
        return bits.astype(self._np_wire, copy=False).data.cast("B")  # fp32 on little-endian: x itself

    def decode(self, payload, numel: int) -> torch.Tensor:
        view = _check_length(self.name, payload, numel, self.encoded_size(numel))
        if numel == 0:
            return torch.empty(0, dtype=torch.float32)
        wire = np.frombuffer(view, dtype=self._np_wire)
        # a writable payload is handed over: keep its memory when it already is native float32
        native = wire if wire.dtype.isnative and wire.flags.writeable else wire.astype("=" + self._np_wire[1:])
        out = torch.from_numpy(native).view(self._torch_dtype)
        out = out if self._torch_dtype == torch.float32 else out.to(torch.float32)
        lo, hi = torch.aminmax(out)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            i = int((~torch.isfinite(out)).nonzero()[0, 0])
            raise CodecError(f"{self.name} payload: expected finite values, got {float(out[i])} at index {i}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FP32Codec(_FloatCodec):
    name = "fp32"
    _bytes = 4
    _torch_dtype = torch.float32
    _bits_dtype = torch.int32
    _np_wire = "<i4"
    _limit = "3.4e38"

    @property
    def lossless(self) -> bool:
        return True


class FP16Codec(_FloatCodec):
    name = "fp16"
    _bytes = 2
    _torch_dtype = torch.float16
    _bits_dtype = torch.int16
    _np_wire = "<i2"
    _limit = "65504"


class BF16Codec(_FloatCodec):
    name = "bf16"
    _bytes = 2
    _torch_dtype = torch.bfloat16
    _bits_dtype = torch.int16
    _np_wire = "<i2"
    _limit = "3.39e38"


class _BlockCodec(Codec):
    """Block-wise absmax quantisation to integers in [-qmax, qmax] with uf16 scales."""

    qmax: int

    def __init__(self, block_size: int = 128):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{self.name}: block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size})"

    def num_blocks(self, numel: int) -> int:
        return -(-int(numel) // self.block_size)

    def _code_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def encoded_size(self, numel: int) -> int:
        return 2 * self.num_blocks(numel) + self._code_bytes(numel)

    def _parts(self, x: torch.Tensor) -> List[torch.Tensor]:
        """2-D views of x: full blocks (rows of block_size), then the short last block."""
        n, b = x.numel(), self.block_size
        full = (n // b) * b
        parts = []
        if full:
            parts.append(x[:full].view(-1, b))
        if n > full:
            parts.append(x[full:].view(1, -1))
        return parts

    # -- encode ---------------------------------------------------------------

    def _quantise(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uf16 scale patterns as int32 [nb], codes int8 [n]) for a non-empty x."""
        parts = self._parts(x)
        absmax = torch.cat([torch.maximum(-lo, hi) for lo, hi in (torch.aminmax(p, dim=1) for p in parts)])
        if not bool(torch.isfinite(absmax).all()):
            raise _non_finite(self.name, x)
        s = absmax / self.qmax
        u = torch.bitwise_right_shift(s.view(torch.int32), 15)  # floor onto uf16 (s >= 0)
        # blocks with a <= 2^-127 would quantise to all zeros: send them as zero blocks
        u = torch.where(absmax > 2.0**-127, u.clamp_min(_MIN_SCALE_U16), torch.zeros_like(u))
        scale = torch.bitwise_left_shift(u, 15).view(torch.float32)
        if not bool(torch.isfinite(scale * self.qmax).all()):
            raise CodecError(
                f"{self.name}.encode: max |x| = {float(absmax.max()):.6g} is too large to quantise (limit about 3.4e38)"
            )
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.empty(x.numel(), dtype=torch.int8)
        # work in cache-sized chunks of whole blocks (elementwise, so chunking
        # cannot change the result)
        chunk_rows = max(1, _CHUNK // self.block_size)
        buf = torch.empty(min(x.numel(), chunk_rows * self.block_size), dtype=torch.float32)
        start, row = 0, 0
        for p in parts:
            for r in range(0, p.shape[0], chunk_rows):
                blk = p[r : r + chunk_rows]
                y = buf[: blk.numel()].view(blk.shape)
                torch.div(blk, safe[row + r : row + r + blk.shape[0], None], out=y)
                y.round_().clamp_(-self.qmax, self.qmax)
                codes[start : start + y.numel()].copy_(y.view(-1))
                start += y.numel()
            row += p.shape[0]
        return u, codes

    def _pack(self, codes: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> bytes:
        x = _check_input(self.name, x)
        n = x.numel()
        if n == 0:
            return b""
        u, codes = self._quantise(x)
        out = np.empty(self.encoded_size(n), dtype=np.uint8)
        nb = u.numel()
        out[: 2 * nb] = u.numpy().astype("<u2").view(np.uint8)
        out[2 * nb :] = self._pack(codes)
        return out.tobytes()

    # -- decode ---------------------------------------------------------------

    def _unpack(self, codes: np.ndarray, numel: int) -> np.ndarray:
        """float32 array of the integer codes; CodecError if a code is invalid."""
        raise NotImplementedError

    def decode(self, payload, numel: int) -> torch.Tensor:
        view = _check_length(self.name, payload, numel, self.encoded_size(numel))
        if numel == 0:
            return torch.empty(0, dtype=torch.float32)
        nb = self.num_blocks(numel)
        raw = np.frombuffer(view, dtype=np.uint8)
        u = raw[: 2 * nb].view("<u2").astype(np.int32)
        bad = np.flatnonzero(u >= _INF_SCALE_U16)
        if bad.size:
            i = int(bad[0])
            raise CodecError(
                f"{self.name} payload: expected finite scales, got "
                f"{'inf' if u[i] == _INF_SCALE_U16 else 'NaN'} for block {i}"
            )
        scale = torch.from_numpy(np.left_shift(u, 15)).view(torch.float32)
        over = (~torch.isfinite(scale * self.qmax)).nonzero()
        if over.numel():
            i = int(over[0, 0])
            raise CodecError(
                f"{self.name} payload: expected scale <= {3.4028235e38 / self.qmax:.4g}, "
                f"got {float(scale[i]):.6g} for block {i} (decoded values would overflow)"
            )
        out = torch.from_numpy(self._unpack(raw[2 * nb :], numel))
        row = 0
        for p in self._parts(out):
            p.mul_(scale[row : row + p.shape[0], None])
            row += p.shape[0]
        return out


class Int8Codec(_BlockCodec):
    name = "int8"
    qmax = 127

    def _code_bytes(self, numel: int) -> int:
        return int(numel)

    def _pack(self, codes: torch.Tensor) -> np.ndarray:
        return codes.numpy().view(np.uint8)

    def _unpack(self, codes: np.ndarray, numel: int) -> np.ndarray:
        q = codes.view(np.int8)
        if int(q.min()) < -self.qmax:
            i = int(np.argmin(q))
            raise CodecError(f"int8 payload: expected codes in [-127, 127], got {int(q[i])} at index {i}")
        return q.astype(np.float32)


class Int4Codec(_BlockCodec):
    name = "int4"
    qmax = 7

    def _code_bytes(self, numel: int) -> int:
        return (int(numel) + 1) // 2

    def _pack(self, codes: torch.Tensor) -> np.ndarray:
        nib = (codes + 8).numpy().view(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        pairs = nib.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def _unpack(self, codes: np.ndarray, numel: int) -> np.ndarray:
        nib = np.empty((codes.size, 2), dtype=np.uint8)
        np.bitwise_and(codes, 0x0F, out=nib[:, 0])
        np.right_shift(codes, 4, out=nib[:, 1])
        flat = nib.reshape(-1)
        if numel % 2 and flat[-1] != 0:
            raise CodecError(f"int4 payload: expected padding nibble 0 after {numel} values, got {int(flat[-1])}")
        flat = flat[:numel]
        if int(flat.min()) == 0:
            i = int(np.argmin(flat))
            raise CodecError(f"int4 payload: expected nibbles in 1..15, got 0 at index {i}")
        out = flat.astype(np.float32)
        out -= 8.0
        return out


# name -> class, for exactly the names of dtrain.config.CODEC_NAMES (the list config validation uses)
_CODECS: Dict[str, Type[Codec]] = {c.name: c for c in (FP32Codec, FP16Codec, BF16Codec, Int8Codec, Int4Codec)}
if tuple(_CODECS) != CODEC_NAMES:  # pragma: no cover - a codec added to one list and not the other
    raise ImportError(f"dtrain.outer.codecs implements {tuple(_CODECS)}, dtrain.config lists {CODEC_NAMES}")


def get_codec(name: str, block_size: int = 128) -> Codec:
    """The codec called ``name`` (block_size applies to int8 / int4 only)."""
    cls = _CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}: expected one of {', '.join(CODEC_NAMES)}")
    if issubclass(cls, _BlockCodec):
        return cls(block_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be an int >= 1, got {block_size!r}")
    return cls()
