"""Seeds every rank agrees on: derived from (seed, purpose, step, peer id ...)
by hashing, so no RNG state has to be carried between steps or processes."""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def rng_for(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))
