"""The global state S_r every peer holds bit for bit after round r.

S_r = (round r, named flat float32 tensors in a fixed order): ``theta`` (the
global parameters), ``velocity`` (the outer optimizer's momentum) and, for the
``ddp`` baseline, the inner optimizer's state. Its bytes are the tensors laid
end to end (little-endian float32); its **state hash** is the sha256 of those
bytes (``dtrain.wire.snapshot.state_hash``), so the hash peers report to the
coordinator and the hash a joiner checks after a transfer are one and the
same. The schedule and sampler positions follow from the round number. The
tensors live on the CPU (pinned when CUDA is present, for fast copies).

The state owns its changes; nothing else writes its tensors:

    nxt = state.outer_step(mean, span, optimizer)   S_{r+1}, computed once (state unchanged)
    nxt = state.outer_step(mean, span, optimizer, covered)   ... where some coordinates nobody trained
    state.install(nxt)                              commit: S_r -> S_{r+1}
    state.adopt(snapshot)                           heal: a donor's S_R, checked against its hash
    state.replace(tensors, round)                   resume from a checkpoint; the ddp baseline's S_{r+1}

Each of them leaves the hash consistent with the bytes.
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..wire.snapshot import BlobMeta, StateSnapshot, state_hash
from .outer_opt import OuterNesterov


def _cpu_f32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu", torch.float32).contiguous().clone()
    if torch.cuda.is_available():
        t = t.pin_memory()
    return t


class StateError(ValueError):
    """A received or loaded state does not fit this peer's model (names, sizes, values)."""


class GlobalState:
    def __init__(self, tensors: Sequence[Tuple[str, torch.Tensor]], round: int = 0):
        self._round = int(round)
        self._tensors: Dict[str, torch.Tensor] = {name: _cpu_f32(t) for name, t in tensors}
        self._hash: Optional[str] = None

    # -- identity -------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self._round

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The named tensors, read only: every change goes through a method of this class."""
        return self._tensors

    def names(self) -> List[str]:
        return list(self._tensors)

    def payload(self) -> bytes:
        assert sys.byteorder == "little", "dtrain's wire format is little-endian"
        return b"".join(t.numpy().tobytes() for t in self._tensors.values())

    def hash(self) -> str:
        if self._hash is None:
            self._hash = state_hash(self.payload())
        return self._hash

    # -- changes ----------------------------------------------------------------------------
    def outer_step(
        self,
        mean: torch.Tensor,
        span: Tuple[int, int],
        optimizer: OuterNesterov,
        covered: Optional[torch.Tensor] = None,
    ) -> "GlobalState":
        """S_{r+1}: the outer optimizer's step with the round's mean pseudo-gradient on ``theta[lo:hi]``
        and ``velocity[lo:hi]`` (one fragment, or everything); this state is left unchanged.

        ``covered`` (bool over the span; None: all): the coordinates some member of the round trained
        (capacity-aware peers). The rule for the others: they keep their value, and so does their
        momentum (frozen, not decayed: a coordinate nobody trained this round is as if the round did not
        happen for it)."""
        lo, hi = span
        theta, velocity = self._tensors["theta"].clone(), self._tensors["velocity"].clone()
        if covered is None:
            optimizer.step(theta[lo:hi], velocity[lo:hi], mean, round=self._round)
        else:
            idx = covered.nonzero().squeeze(1) + lo
            part_theta, part_velocity = theta[idx], velocity[idx]
            optimizer.step(part_theta, part_velocity, mean[covered], round=self._round)
            theta[idx], velocity[idx] = part_theta, part_velocity
        nxt = GlobalState.__new__(GlobalState)
        nxt._round, nxt._hash = self._round + 1, None
        nxt._tensors = {**self._tensors, "theta": theta, "velocity": velocity}
        return nxt

    def install(self, nxt: "GlobalState") -> None:
        """Commit: this state becomes ``nxt`` (computed by :meth:`outer_step` or loaded)."""
        if list(nxt._tensors) != list(self._tensors):
            raise StateError(f"state with tensors {list(nxt._tensors)} cannot replace {list(self._tensors)}")
        self._tensors, self._round, self._hash = nxt._tensors, nxt._round, nxt._hash

    def replace(self, tensors: Mapping[str, torch.Tensor], round: int) -> None:
        """Take new tensors (same names and sizes) and round: a resumed checkpoint, the ddp baseline's
        state after its optimizer step."""
        if sorted(tensors) != sorted(self._tensors):
            raise StateError(f"state with tensors {sorted(tensors)} cannot replace {sorted(self._tensors)}")
        new = {}
        for name, mine in self._tensors.items():
            t = _cpu_f32(tensors[name])
            if t.numel() != mine.numel():
                raise StateError(f"tensor {name!r} has {t.numel()} values, expected {mine.numel()}")
            new[name] = t.reshape(mine.shape)
        self._tensors, self._round, self._hash = new, int(round), None

    # -- transfer -------------------------------------------------------------------------
    def snapshot(self, meta: Optional[dict] = None) -> StateSnapshot:
        blobs, offset, parts = [], 0, []
        for name, t in self._tensors.items():
            data = t.numpy().tobytes()
            blobs.append(BlobMeta(name, offset, len(data), "float32", tuple(t.shape)))
            parts.append(data)
            offset += len(data)
        payload = b"".join(parts)
        return StateSnapshot(
            self._round, payload, json.dumps(meta or {}, sort_keys=True), tuple(blobs), state_hash=self.hash()
        )

    def adopt(self, snap: StateSnapshot) -> None:
        """Heal: take a received snapshot; StateError (and nothing changed) if it does not match ours."""
        got = {b.name: b for b in snap.blobs}
        if sorted(got) != sorted(self._tensors):
            raise StateError(f"received state has tensors {sorted(got)}, expected {sorted(self._tensors)}")
        new = {}
        for name, mine in self._tensors.items():
            b = got[name]
            if b.dtype != "float32" or b.nbytes != mine.numel() * 4:
                raise StateError(
                    f"received tensor {name!r} is {b.dtype} of {b.nbytes} bytes, expected "
                    f"float32 of {mine.numel() * 4} bytes"
                )
            t = torch.frombuffer(bytearray(snap.payload[b.offset : b.offset + b.nbytes]), dtype=torch.float32)
            if not torch.isfinite(t).all():
                raise StateError(f"received tensor {name!r} has non-finite values")
            new[name] = _cpu_f32(t)
        h = state_hash(b"".join(new[name].numpy().tobytes() for name in self._tensors))
        if h != snap.state_hash:
            raise StateError(f"received state hashes to {h[:12]}..., the donor said {snap.state_hash[:12]}...")
        self._tensors = {name: new[name] for name in self._tensors}
        self._round = snap.round
        self._hash = h
