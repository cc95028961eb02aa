"""Costs of a subnet and the budgets it must meet.

``cost(arch)`` is ``{"macs", "params"}`` from the supernet's analytical cost
model, plus ``"latency_ms"`` predicted from a latency table when one is given.
``violation(cost)`` names the first budget a cost breaks (None: within all).
"""

from __future__ import annotations

from typing import Optional

from ..config import ConfigError
from .latency import LatencyTable

LIMITS = (("max_macs", "macs"), ("max_params", "params"), ("max_latency_ms", "latency_ms"))


class Budget:
    def __init__(self, model, model_cfg, constraints):
        self.model, self.constraints = model, constraints
        self.latency = LatencyTable(constraints.latency_table, model, model_cfg) if constraints.latency_table else None
        self._cache: dict = {}

    def cost(self, arch: dict) -> dict:
        key = self.model.space.key(arch)
        if key not in self._cache:
            c = dict(self.model.cost(arch))
            c["latency_ms"] = self.latency.predict(arch) if self.latency is not None else None
            self._cache[key] = c
        return dict(self._cache[key])

    def violation(self, cost: dict) -> Optional[str]:
        for limit, key in LIMITS:
            cap = getattr(self.constraints, limit)
            if cap is not None and cost[key] is not None and cost[key] > cap:
                return f"{key}={cost[key]:g} > constraints.{limit}={cap:g}"
        return None

    def check_reachable(self) -> None:
        """ConfigError when even the smallest subnet breaks a budget (nothing to search)."""
        smallest = self.model.space.min()
        why = self.violation(self.cost(smallest))
        if why is not None:
            cost = self.cost(smallest)
            limit, key = next((lim, k) for lim, k in LIMITS if f"constraints.{lim}=" in why)
            raise ConfigError(
                f"constraints.{limit}={getattr(self.constraints, limit):g} is not allowed: the smallest "
                f"subnet already has {key}={cost[key]:g}; raise the budget to at least that"
            )
