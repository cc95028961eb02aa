"""A peer's capacity: its top arch, the largest arch of the space within its budgets.

A capped peer (``capacity.max_macs`` / ``max_params`` / ``max_latency_ms``)
trains only archs inside its top arch (``SearchSpace.within``): the top arch
itself, the space's smallest subnet and random archs below the top. Because
subnets are nested slices of the supernet's weights (first channels, centre
kernels, first blocks, first heads), all of them use only the top arch's
slice of the parameters.

The rule, deterministic (the same space, cost model and budgets always give
the same arch):

1. the whole supernet's largest arch, if it fits;
2. else the largest *uniform* arch that fits: every list entry (per block or
   layer) set to one choice per key, every combination of choices tried;
   "largest" is the greatest (params, MACs), ties broken by the arch's
   canonical key;
3. then grow it one value at a time: of all archs one choice larger in one
   value that still fit, take the largest by (params, MACs, key); repeat
   until none fits. The result is maximal: no single value can grow within
   the budgets.

Params come first because the parameters are what a peer trains and sends
(its slice); MACs break ties (at equal parameters, e.g. resolution, the peer
takes the most compute it can afford). A budget below the smallest subnet is
a one-line error naming the minimum cost.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Callable, List, Optional, Tuple

from .budget import Budget
from .space import SearchSpace


def _size(budget: Budget, space: SearchSpace, arch: dict) -> Tuple[float, float, str]:
    cost = budget.cost(arch)
    return (cost["params"], cost["macs"], space.key(arch))


def uniform_archs(space: SearchSpace) -> List[dict]:
    """Every arch whose list values are all one choice per key (one per combination of choices)."""
    top = space.max()
    table = space.choice_table()
    keys = list(top)
    out = []
    for values in itertools.product(*(table[k] for k in keys)):
        arch = {k: ([v] * len(top[k]) if isinstance(top[k], list) else v) for k, v in zip(keys, values)}
        out.append(space.validate(arch))
    return out


def one_larger(space: SearchSpace, arch: dict) -> List[dict]:
    """The archs that differ from ``arch`` by one value, one choice larger (canonical, without repeats)."""
    table = space.choice_table()
    seen, out = {space.key(arch)}, []
    for key, index in space.genes():
        choices = table[key]
        value = arch[key][index] if index is not None else arch[key]
        pos = choices.index(value)
        if pos + 1 >= len(choices):
            continue
        grown = {k: (list(v) if isinstance(v, list) else v) for k, v in arch.items()}
        if index is None:
            grown[key] = choices[pos + 1]
        else:
            grown[key][index] = choices[pos + 1]
        grown = space.validate(grown)
        k = space.key(grown)
        if k not in seen:
            seen.add(k)
            out.append(grown)
    return out


def top_arch(space: SearchSpace, budget: Budget) -> dict:
    """The largest arch within ``budget`` by the rule of the module docstring."""
    fits: Callable[[dict], bool] = budget.fits
    best = space.max()
    if fits(best):
        return best
    budget.check_reachable()
    candidates = [a for a in uniform_archs(space) if fits(a)]
    best = max(candidates, key=lambda a: _size(budget, space, a))
    while True:
        grown = [a for a in one_larger(space, best) if fits(a)]
        if not grown:
            return best
        best = max(grown, key=lambda a: _size(budget, space, a))


LADDER_STEPS = 3  # capacity=auto: how many halvings of MACs below the configured capacity


def _limited(capacity) -> bool:
    return any(getattr(capacity, k) is not None for k in ("max_macs", "max_params", "max_latency_ms"))


def capacity_top_arch(model, model_cfg, capacity) -> Optional[dict]:
    """The top arch of a ``capacity`` config (None: the whole supernet, no limit set)."""
    if not _limited(capacity):
        return None
    return top_arch(model.space, Budget(model, model_cfg, capacity, key="capacity"))


def capacity_ladder(model, model_cfg, capacity) -> List[Optional[dict]]:
    """The top archs a peer may train within, largest first. Level 0 is the configured capacity's (None:
    the whole supernet); with ``capacity.auto``, then the top archs of MAC budgets halving from level 0's
    MACs (``LADDER_STEPS`` times, never below the smallest subnet's MACs; the other limits still apply),
    without repeats."""
    ladder = [capacity_top_arch(model, model_cfg, capacity)]
    if not capacity.auto:
        return ladder
    space = model.space
    macs = model.cost(ladder[0] if ladder[0] is not None else space.max())["macs"]
    smallest = model.cost(space.min())["macs"]
    for k in range(1, LADDER_STEPS + 1):
        limits = SimpleNamespace(
            max_macs=max(macs / 2**k, smallest),
            max_params=capacity.max_params,
            max_latency_ms=capacity.max_latency_ms,
            latency_table=capacity.latency_table,
        )
        arch = top_arch(space, Budget(model, model_cfg, limits, key="capacity"))
        previous = ladder[-1] if ladder[-1] is not None else space.max()
        if space.key(arch) != space.key(previous):
            ladder.append(arch)
    return ladder


def sandwich_macs(model, top: Optional[dict], num_random: int) -> float:
    """What one sandwich step inside ``top`` costs, roughly: the top arch, the smallest arch and
    ``num_random`` archs of about half the top's MACs (the ladder compares levels by it)."""
    top_macs = model.cost(top if top is not None else model.space.max())["macs"]
    return top_macs * (1.0 + num_random / 2.0) + model.cost(model.space.min())["macs"]
