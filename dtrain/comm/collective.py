"""The outer collective interface: mean of one flat fp32 tensor across a quorum.

Every backend (``grpc``, ``gloo``) implements :class:`Collective`:

    result = collective.allreduce_mean(flat, group, deadline_s)

- ``flat``: this member's 1-D float32 CPU tensor (already on the codec's grid
  when error feedback is used); every member passes the same ``numel``.
- ``group``: who takes part, in ring order, and which exchange this is.
- Returns the mean (a new tensor) and the payload bytes this member sent and
  received. The reduction order is fixed (members in ring order), so every
  member ends with the same bits. With ``group.weights`` the mean is the
  weighted one of ``dtrain.outer.weighting`` (all weights 1: the plain mean,
  bit for bit).
- Slices (``group.masks``, ``dtrain.outer.masking``): when the group has masks
  and this member's is not None, ``flat`` is its **compact** payload, the
  values of the coordinates its mask covers in increasing coordinate order
  (``mask.sum()`` values); otherwise the full vector of N values (N = the
  masks' length). The result is always the full N: per coordinate, the
  weighted mean over the members whose mask covers it (``masked_weighted_mean``:
  float32, ring order, products rounded before the sum), 0.0 where no member
  of positive weight covers it, and ``CollectiveResult.covered`` marks the
  covered coordinates (None when all are). Every member gets the same bits of
  both. No masks, or all None: exactly the unmasked collective.
- Any member failing or missing ``deadline_s`` makes every member's call
  raise :class:`CollectiveError` within the deadline, and nothing is applied.
  A member that sent an invalid payload (wrong length, shape, dtype,
  non-finite values; with masks, a compact payload whose length is not its
  mask's count) is named in ``CollectiveError.culprit``, so the caller can
  report it to the coordinator.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..outer.weighting import total_weight


@dataclass(frozen=True)
class Group:
    quorum_id: int
    round: int
    members: Tuple[Tuple[str, str], ...]  # (peer_id, data-plane address), ring order
    me: str
    op: str = "all"  # names the exchange within a round (e.g. "f0" for fragment 0)
    store_address: str = ""  # TCPStore host:port (gloo)
    # each member's integer weight in the mean, in ring order (``dtrain.outer.weighting``); empty: all 1
    weights: Tuple[int, ...] = ()
    # each member's slice, in ring order (``dtrain.outer.masking``): a 1-D bool CPU tensor over the full flat
    # vector (True: a coordinate it covers), or None for a member that covers everything; empty: all None.
    # Every member computes them alike (from the announced slice specs); they never travel.
    masks: Tuple[Optional[torch.Tensor], ...] = field(default=(), compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def masked(self) -> bool:
        """Whether some member covers only a slice (else the collective is the unmasked one, bit for bit)."""
        return any(m is not None for m in self.masks)

    def mask(self, rank: int) -> Optional[torch.Tensor]:
        return self.masks[rank] if self.masks else None

    def weight(self, rank: int) -> int:
        return self.weights[rank] if self.weights else 1

    @property
    def total_weight(self) -> int:
        return total_weight(self.weights) if self.weights else len(self.members)

    @property
    def rank(self) -> int:
        return [m[0] for m in self.members].index(self.me)


@dataclass
class CollectiveResult:
    tensor: torch.Tensor
    bytes_sent: int
    bytes_recv: int
    seconds: float
    # with masks: the coordinates some member of positive weight covers (bool, full length); None when all are
    covered: Optional[torch.Tensor] = None


class CollectiveError(RuntimeError):
    """The collective failed (deadline, dead member, garbage); nothing may be applied.

    ``culprit``: the member whose payload was invalid, when one was; ``evidence``: the hash of the bytes
    judged bad (:func:`evidence_of`; "" when no bytes were, e.g. a self-reported non-finite flag)."""

    def __init__(self, message: str, culprit: Optional[str] = None, evidence: str = ""):
        super().__init__(message)
        self.culprit = culprit
        self.evidence = evidence


def evidence_of(data) -> str:
    """The evidence an accusation carries: the SHA-256 (hex) of the bytes judged bad."""
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


class Collective(ABC):
    name: str = ""

    @abstractmethod
    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        """Mean of ``flat`` over the group's members (see the module docstring)."""

    def close(self) -> None:
        """Release connections / process groups.

        Deliberately not abstract: a collective that holds none (a test or simulation wrapper) keeps this no-op.
        """
        return None
