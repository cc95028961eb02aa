"""Weighted outer averaging: each member's pseudo-gradient counts by the samples it trained.

With ``outer.weighting=samples`` member i's weight is the samples it trained in
the round (its inner steps times its batch); with ``uniform`` every member
that trained counts once. A member that trained nothing (it sat out) weighs 0
either way. The weights are reduced to the smallest integers with the same
ratios (``integer_weights``), so that equal weights are all 1 and the mean is
computed exactly as the unweighted one always was::

    mean = (w_1 * x_1 + w_2 * x_2 + ... + w_k * x_k) / (w_1 + ... + w_k)

summed in the fixed member (ring) order in float32, from zeros, one term per
member: ``total += fl(w_i * x_i)`` (the product rounded to float32, then the
sum: two roundings; skipped when ``w_i = 0``), then one division: every member
that sums the same decoded parts in the same order gets the same bits, on any
CPU. (Never ``add_(x_i, alpha=w_i)``: torch fuses that into one FMA in its
AVX2/AVX512 kernels and not in its default (scalar) ones, so its bits would
depend on the machine; the gloo members each compute this sum themselves.)
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Optional, Sequence, Tuple

import torch

WEIGHTINGS = ("samples", "uniform")


def integer_weights(samples: Sequence[int], weighting: str = "samples") -> Tuple[int, ...]:
    """Members' weights as the smallest non-negative integers with the ratios of ``samples``
    (``uniform``: 1 for every member with samples); all zero when nobody trained."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not allowed: {' or '.join(WEIGHTINGS)}")
    if any(s < 0 for s in samples):
        raise ValueError(f"samples {list(samples)} must be >= 0")
    raw = [1 if s > 0 else 0 for s in samples] if weighting == "uniform" else [int(s) for s in samples]
    divisor = reduce(math.gcd, raw, 0)
    return tuple(w // divisor for w in raw) if divisor else tuple(raw)


def weighted_sum_into(total: torch.Tensor, part: torch.Tensor, weight: int) -> None:
    """``total += fl(weight * part)`` in place, two roundings (one step of the fixed-order sum; a 0 weight
    adds nothing)."""
    if weight == 1:
        total.add_(part)
    elif weight:
        total.add_(part * weight)  # not alpha=weight: a fused multiply-add on some CPUs only (module docstring)


def finish_mean(total: torch.Tensor, weights: Sequence[int]) -> torch.Tensor:
    """Divide the fixed-order weighted sum by the total weight, in place."""
    return total.div_(total_weight(weights))


def total_weight(weights: Sequence[int]) -> int:
    w = sum(weights)
    if w <= 0:
        raise ValueError("no member of the group trained any samples: nothing to average")
    return w


def weighted_mean(parts: Sequence[torch.Tensor], weights: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The reference: the weighted mean of ``parts`` in their order (equal weights when None)."""
    weights = tuple(weights) if weights is not None else (1,) * len(parts)
    total = torch.zeros_like(parts[0], dtype=torch.float32)
    for part, w in zip(parts, weights):
        weighted_sum_into(total, part, w)
    return finish_mean(total, weights)
