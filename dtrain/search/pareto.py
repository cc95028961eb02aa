"""Pareto fronts on (score, cost): higher score and lower cost are better.

``pareto_ranks`` is non-dominated sorting: rank 0 is the front (no other point
has a score at least as high and a cost at least as low, one of them strictly),
rank 1 the front of what is left, and so on. O(n^2) per rank; searches
evaluate hundreds of candidates, not millions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple


def dominates(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """``a`` = (score, cost) dominates ``b``."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_ranks(points: Sequence[Tuple[float, float]]) -> List[int]:
    ranks = [-1] * len(points)
    left = set(range(len(points)))
    rank = 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def front_indices(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the rank-0 points, by cost ascending (then score descending)."""
    ranks = pareto_ranks(points)
    idx = [i for i, r in enumerate(ranks) if r == 0]
    return sorted(idx, key=lambda i: (points[i][1], -points[i][0], i))
