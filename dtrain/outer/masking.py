"""Slices of the flat vector: the maths of the masked (capacity-aware) mean, with no network.

A member of a quorum may cover only part of the flat vector of N values (its
slice of the supernet). Its **mask** is a 1-D bool CPU tensor of length N,
True at the coordinates it covers; None means it covers all N. Every member
computes every member's mask the same way (from the slice specs the quorum
view carries), so masks never travel. A member hands the collective its
**compact** payload: the values at its covered coordinates in increasing
coordinate order, ``compact(x, mask)``, of length ``mask.sum()``;
``scatter`` puts such values back at their coordinates.

The masked weighted mean. With the members' integer weights w_j
(``dtrain.outer.weighting``), in ring order:

    W[c]    = sum of w_j over the members j whose mask covers c   (an integer)
    mean[c] = (sum over those j, in ring order, from +0.0, of fl(w_j * x_j[c])) / W[c]   where W[c] > 0
    mean[c] = 0.0                                                                    where W[c] = 0

in float32: the product rounded, then the sum (never a fused multiply-add),
then one division by float32(W[c]); a w_j = 0 term is skipped. Coordinate c is
**covered** when W[c] > 0, i.e. when a member of positive weight covers it (a
member of weight 0 trained nothing, whatever its mask); the caller keeps its
old value where c is not covered. ``masked_weighted_mean`` is this formula.

Three facts the collectives rely on:

- Adding a member's values scattered into zeros (all N) gives the same bits as
  skipping the coordinates it does not cover: the running sum starts at +0.0
  and is never -0.0 (x + (-x) is +0.0 in round-to-nearest), and t + 0.0 = t
  for any other t.
- Where every member covers c, W[c] is the total weight and mean[c] has the
  bits of the unmasked ``weighted_mean`` (float32 division is correctly
  rounded, whether by a tensor of W or by the scalar total weight).
- Everything here is elementwise or an integer count: the same bits on every
  CPU.

The ``grpc`` backend's shard rule (``shard_layout``). The collective cuts the
N coordinates into k contiguous shards; member i owns shard i (sums it in
phase 1, sends its mean in phase 2). With masks, let M be the number of
covered coordinates and c_i the number member i covers (N when its mask is
None). The covered coordinates are cut into k contiguous runs, run i of size
s_i proportional to

    q_i = c_i / ((k - 1) M - c_i)        (q_i = 0 when c_i = 0)

(``owner_sizes``: cumulative floors of M times the running share, exact in
integers); shard i then runs from its run's first covered coordinate to the
next run's (the first shard from 0, the last to N), so uncovered coordinates
belong to the shard of the covered ones before them. Why: member i sends about
c_i - c_i s_i / M values in phase 1 (its coordinates outside its own shard)
and (k - 1) s_i in phase 2 (its shard's covered means to everyone else), i.e.
c_i + s_i ((k - 1) M - c_i) / M; with s_i = lambda q_i that is
c_i (1 + lambda / M) for every member: **bytes sent proportional to the
slice** (exactly for masks spread evenly over the vector; for masks bunched in
one region, to within what its own shard holds of its slice). A member
covering 25% among three full members (k = 4) owns 1/11 where they own 1/2
each, i.e. a share of about a fifth of theirs. All members full: q_i = 1/(k-2),
equal shards. When (k - 1) M <= c_i (k = 2 and member i covers every covered
coordinate; k = 1) owning costs member i nothing: the members with c_i > 0 and
(k - 1) M <= c_i own everything, in equal runs (k = 2, one full member: it owns
all, the other sends just its slice). Nobody covering anything: equal runs of
nothing.

A member sends owner i not only the values it covers in shard i but the whole
codec blocks of its compact payload that hold them (``ShardLayout.part``): its
blocks are those of its whole compact payload, so a payload that error feedback
put on the codec's grid crosses phase 1 without further loss (owners of
neighbouring shards both get a boundary block: at most two extra blocks per
shard). Phase 2 carries only the covered coordinates of each shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .weighting import weighted_sum_into

Mask = Optional[torch.Tensor]
CHUNK = 1 << 20  # coordinates per step where a step would otherwise allocate O(N) integers


def check_masks(masks: Sequence[Mask], k: int) -> Optional[int]:
    """Check ``masks`` (empty, or k entries, each None or a 1-D bool CPU tensor, all of one length N); N, or
    None when no member has a mask (the unmasked collective: empty or all None). ValueError when malformed."""
    if not masks:
        return None
    if len(masks) != k:
        raise ValueError(f"{len(masks)} masks for {k} members (one per member, in ring order, or none)")
    n: Optional[int] = None
    for j, m in enumerate(masks):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype != torch.bool or m.device.type != "cpu":
            raise ValueError(f"mask {j} must be None or a 1-D bool CPU tensor")
        if n is None:
            n = m.numel()
        elif m.numel() != n:
            raise ValueError(f"mask {j} has {m.numel()} entries, mask of an earlier member {n}")
    return n


def mask_count(mask: Mask, n: int) -> int:
    """Coordinates ``mask`` covers (all ``n`` when None): the length of the member's compact payload."""
    return n if mask is None else int(mask.sum())


def compact(x: torch.Tensor, mask: Mask) -> torch.Tensor:
    """The values of ``x`` at the coordinates ``mask`` covers, in increasing coordinate order (new memory)."""
    return x.clone() if mask is None else x[mask]


def scatter(values: torch.Tensor, mask: Mask, n: int) -> torch.Tensor:
    """A new float32 tensor of ``n`` values: ``values`` at the coordinates ``mask`` covers, 0.0 elsewhere."""
    if mask is None:
        if values.numel() != n:
            raise ValueError(f"{values.numel()} values for a full vector of {n}")
        return values.to(torch.float32, copy=True)
    if mask.numel() != n or values.numel() != int(mask.sum()):
        raise ValueError(f"{values.numel()} values for a mask of {mask.numel()} covering {int(mask.sum())}")
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = values
    return out


def covered_mask(masks: Sequence[Mask], weights: Sequence[int], n: int) -> Optional[torch.Tensor]:
    """The covered coordinates (W > 0: covered by a member of positive weight) as a new bool tensor of ``n``;
    None when every coordinate is covered."""
    if any(w and m is None for m, w in zip(masks, weights)):
        return None
    out = torch.zeros(n, dtype=torch.bool)
    for m, w in zip(masks, weights):
        if w and m is not None:  # (never None here: a weighted None returned above)
            out |= m
    return None if bool(out.all()) else out


def weight_sums(masks: Sequence[Mask], weights: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """W[c] for the coordinates ``start <= c < stop``, as int64."""
    total = torch.zeros(stop - start, dtype=torch.int64)
    for m, w in zip(masks, weights):
        if not w:
            continue
        if m is None:
            total += w
        else:
            total[m[start:stop]] += w
    return total


def divide_by_weight_sums(total: torch.Tensor, masks: Sequence[Mask], weights: Sequence[int]) -> torch.Tensor:
    """``total[c] / float32(W[c])`` in place where W[c] > 0, exactly 0.0 where W[c] = 0; returns ``total``.
    (In steps of ``CHUNK`` coordinates: W is never held for all N at once.)"""
    n = total.numel()
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        w = weight_sums(masks, weights, start, stop)
        pos = w > 0
        part = total[start:stop]
        part.div_(torch.where(pos, w, 1).to(torch.float32))
        part.masked_fill_(~pos, 0.0)
    return total


def masked_weighted_sum_into(total: torch.Tensor, part: torch.Tensor, mask: Mask, weight: int) -> None:
    """``total[c] += fl(weight * x[c])`` at the coordinates ``mask`` covers, ``part`` being the compact values
    (``weighted_sum_into`` on those coordinates: two roundings; a 0 weight adds nothing)."""
    if not weight:
        return
    if mask is None:
        weighted_sum_into(total, part, weight)
        return
    sub = total[mask]
    weighted_sum_into(sub, part, weight)
    total[mask] = sub


def masked_weighted_mean(
    parts: Sequence[torch.Tensor], masks: Sequence[Mask], weights: Sequence[int], n: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The reference (module docstring): the masked weighted mean of the compact ``parts`` over ``n``
    coordinates, and the covered coordinates (None: all)."""
    if not (len(parts) == len(masks) == len(weights)):
        raise ValueError(f"{len(parts)} parts, {len(masks)} masks, {len(weights)} weights")
    total = torch.zeros(n, dtype=torch.float32)
    for part, m, w in zip(parts, masks, weights):  # ring order: the same sum on every member
        masked_weighted_sum_into(total, part, m, w)
    divide_by_weight_sums(total, masks, weights)
    return total, covered_mask(masks, weights, n)


def masks_digest(masks: Sequence[Mask]) -> str:
    """A short hash of the masks (None and all-True differ), to check that members agree on them."""
    h = hashlib.sha256()
    for m in masks:
        if m is None:
            h.update(b"*")
        else:
            h.update(f"{m.numel()}:".encode())
            h.update(np.packbits(m.numpy()).tobytes())
        h.update(b";")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the grpc backend's shards


def owner_sizes(counts: Sequence[int], covered: int) -> List[int]:
    """How many covered coordinates each member owns (module docstring): sizes proportional to
    c_i / ((k-1) M - c_i), summing to ``covered`` (M); ``counts`` are the c_i, in ring order."""
    k = len(counts)
    if k == 0:
        return []
    gaps = [(k - 1) * covered - c for c in counts]
    free = [c > 0 and g <= 0 for c, g in zip(counts, gaps)]
    if any(free):
        shares = [Fraction(int(f)) for f in free]
    else:
        shares = [Fraction(c, g) if c > 0 else Fraction(0) for c, g in zip(counts, gaps)]
    if not any(shares):
        shares = [Fraction(1)] * k
    whole = sum(shares)
    edges, running = [0], Fraction(0)
    for s in shares:
        running += s
        edges.append(int(covered * running / whole))  # floor; the last is exactly ``covered``
    return [edges[i + 1] - edges[i] for i in range(k)]


def nth_true(mask: torch.Tensor, ranks: Sequence[int]) -> List[int]:
    """The coordinates of the ``ranks``-th True entries of ``mask`` (0-based, ranks ascending, each below the
    count of True), without an O(N) index tensor."""
    out: List[int] = []
    seen, i = 0, 0
    for start in range(0, mask.numel(), CHUNK):
        if i == len(ranks):
            break
        chunk = mask[start : start + CHUNK]
        here = int(chunk.sum())
        if i < len(ranks) and ranks[i] < seen + here:
            where = torch.nonzero(chunk).flatten()
            while i < len(ranks) and ranks[i] < seen + here:
                out.append(start + int(where[ranks[i] - seen]))
                i += 1
        seen += here
    if i != len(ranks):
        raise ValueError(f"ranks {list(ranks)} reach past the {seen} True entries")
    return out


@dataclass(frozen=True)
class ShardLayout:
    """Who owns which coordinates and what every member sends every owner (module docstring).

    ``edges``: k + 1 coordinates, shard i = [edges[i], edges[i+1]). ``offsets[j][i]``: how many coordinates
    member j covers below edges[i] (so its values in shard i are its compact payload's
    [offsets[j][i], offsets[j][i+1])). ``counts[j]``: its compact length. ``covered``: the covered coordinates
    (None: all); ``covered_counts[i]``: how many lie in shard i (what owner i sends in phase 2)."""

    n: int
    edges: Tuple[int, ...]
    offsets: Tuple[Tuple[int, ...], ...]
    counts: Tuple[int, ...]
    covered: Optional[torch.Tensor]
    covered_counts: Tuple[int, ...]
    block: int = 1

    @property
    def k(self) -> int:
        return len(self.counts)

    def part(self, j: int, i: int) -> Tuple[int, int, int, int]:
        """(lo, hi, a, b): member j's values in shard i are its compact payload's [lo, hi); it sends [a, b),
        that range widened to whole codec blocks of its payload (nothing when lo == hi)."""
        lo, hi = self.offsets[j][i], self.offsets[j][i + 1]
        if lo == hi:
            return lo, hi, lo, lo
        a = lo - lo % self.block
        b = min(self.counts[j], hi + (-hi) % self.block)
        return lo, hi, a, b

    def covered_in(self, i: int) -> Optional[torch.Tensor]:
        """The covered coordinates of shard i as a bool tensor over it (None: all of it)."""
        if self.covered is None:
            return None
        return self.covered[self.edges[i] : self.edges[i + 1]]


def shard_layout(masks: Sequence[Mask], weights: Sequence[int], n: int, block: int = 1) -> ShardLayout:
    """The grpc backend's shards for ``masks`` (one per member, ring order) over ``n`` coordinates; ``block``:
    the codec's block size (1 for elementwise codecs)."""
    k = len(masks)
    covered = covered_mask(masks, weights, n)
    m = n if covered is None else int(covered.sum())
    counts = tuple(mask_count(mask, n) for mask in masks)
    sizes = owner_sizes(counts, m)
    runs = [sum(sizes[:i]) for i in range(1, k)]  # the first covered coordinate of shards 1..k-1 (as ranks)
    inner = [r for r in runs if r < m]
    if covered is None:
        at = inner
    else:
        at = nth_true(covered, inner)
    edges = (0, *at, *([n] * (len(runs) - len(inner))), n) if k else (0,)
    offsets = []
    for mask in masks:
        if mask is None:
            offsets.append(edges)
        else:
            seg = [int(mask[edges[i] : edges[i + 1]].sum()) for i in range(k)]
            offsets.append(tuple(int(x) for x in np.cumsum([0, *seg])))
    if covered is None:
        cov_counts = tuple(edges[i + 1] - edges[i] for i in range(k))
    else:
        cov_counts = tuple(sizes)
    return ShardLayout(n, tuple(edges), tuple(offsets), counts, covered, cov_counts, max(1, int(block)))
