"""The global state S_r every peer holds bit for bit after round r.

S_r = (round r, named flat float32 tensors in a fixed order): ``theta`` (the
global parameters), ``velocity`` (the outer optimizer's momentum) and, for the
``ddp`` baseline, the inner optimizer's state. Its bytes are the tensors laid
end to end (little-endian float32); its **state hash** is the sha256 of those
bytes (``dtrain.wire.snapshot.state_hash``), so the hash peers report
to the coordinator and the hash a joiner checks after a transfer are one and
the same. The schedule and sampler positions follow from the round number.
The tensors live on the CPU (pinned when CUDA is present, for fast copies).
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..wire.snapshot import BlobMeta, StateSnapshot, state_hash


def _cpu_f32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu", torch.float32).contiguous().clone()
    if torch.cuda.is_available():
        t = t.pin_memory()
    return t


class StateError(ValueError):
    """A received state does not fit this peer's model (names, sizes)."""


class GlobalState:
    def __init__(self, tensors: Sequence[Tuple[str, torch.Tensor]], round: int = 0):
        self.round = int(round)
        self.tensors: Dict[str, torch.Tensor] = {name: _cpu_f32(t) for name, t in tensors}
        self._hash: Optional[str] = None

    # -- identity -------------------------------------------------------------------------
    def names(self) -> List[str]:
        return list(self.tensors)

    def payload(self) -> bytes:
        assert sys.byteorder == "little", "dtrain's wire format is little-endian"
        return b"".join(t.numpy().tobytes() for t in self.tensors.values())

    def hash(self) -> str:
        if self._hash is None:
            self._hash = state_hash(self.payload())
        return self._hash

    def changed(self) -> None:
        """Call after modifying a tensor in place."""
        self._hash = None

    # -- transfer -------------------------------------------------------------------------
    def snapshot(self, meta: Optional[dict] = None) -> StateSnapshot:
        blobs, offset, parts = [], 0, []
        for name, t in self.tensors.items():
            data = t.numpy().tobytes()
            blobs.append(BlobMeta(name, offset, len(data), "float32", tuple(t.shape)))
            parts.append(data)
            offset += len(data)
        payload = b"".join(parts)
        return StateSnapshot(self.round, payload, json.dumps(meta or {}, sort_keys=True), tuple(blobs),
                             state_hash=self.hash())

    def adopt(self, snap: StateSnapshot) -> None:
        """Take a received snapshot; StateError if its tensors do not match ours."""
        got = {b.name: b for b in snap.blobs}
        if sorted(got) != sorted(self.tensors):
            raise StateError(f"received state has tensors {sorted(got)}, expected {sorted(self.tensors)}")
        new = {}
        for name, mine in self.tensors.items():
            b = got[name]
            if b.dtype != "float32" or b.nbytes != mine.numel() * 4:
                raise StateError(f"received tensor {name!r} is {b.dtype} of {b.nbytes} bytes, expected "
                                 f"float32 of {mine.numel() * 4} bytes")
            t = torch.frombuffer(bytearray(snap.payload[b.offset:b.offset + b.nbytes]), dtype=torch.float32)
            if not torch.isfinite(t).all():
                raise StateError(f"received tensor {name!r} has non-finite values")
            new[name] = _cpu_f32(t)
        h = state_hash(b"".join(new[name].numpy().tobytes() for name in self.tensors))
        if h != snap.state_hash:
            raise StateError(f"received state hashes to {h[:12]}..., the donor said {snap.state_hash[:12]}...")
        self.tensors = {name: new[name] for name in self.tensors}
        self.round = snap.round
        self._hash = h
