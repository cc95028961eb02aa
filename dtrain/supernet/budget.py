"""Costs of a subnet and the budgets it must meet (search constraints, a peer's capacity).

``cost(arch)`` is ``{"macs", "params"}`` from the supernet's analytical cost
model, plus ``"latency_ms"`` predicted from a latency table when one is given.
``violation(cost)`` names the first budget a cost breaks (None: within all).
The budgets are read from any object with ``max_macs``, ``max_params``,
``max_latency_ms`` and ``latency_table`` (``None`` or 0: no limit); ``key``
names that object's config group in messages (``constraints``, ``capacity``).
"""

from __future__ import annotations

from typing import Optional

from ..config import ConfigError
from .latency_table import LatencyTable

LIMITS = (("max_macs", "macs"), ("max_params", "params"), ("max_latency_ms", "latency_ms"))


class Budget:
    def __init__(self, model, model_cfg, limits, key: str = "constraints"):
        self.model, self.limits, self.key = model, limits, key
        self.latency = LatencyTable(limits.latency_table, model, model_cfg) if limits.latency_table else None
        self._cache: dict = {}

    def cost(self, arch: dict) -> dict:
        key = self.model.space.key(arch)
        if key not in self._cache:
            c = dict(self.model.cost(arch))
            c["latency_ms"] = self.latency.predict(arch) if self.latency is not None else None
            self._cache[key] = c
        return dict(self._cache[key])

    def cap(self, limit: str) -> Optional[float]:
        value = getattr(self.limits, limit)
        return value if value else None  # None and 0 both mean: no limit

    @property
    def unlimited(self) -> bool:
        return all(self.cap(limit) is None for limit, _ in LIMITS)

    def violation(self, cost: dict) -> Optional[str]:
        for limit, key in LIMITS:
            cap = self.cap(limit)
            if cap is not None and cost[key] is not None and cost[key] > cap:
                return f"{key}={cost[key]:g} > {self.key}.{limit}={cap:g}"
        return None

    def fits(self, arch: dict) -> bool:
        return self.violation(self.cost(arch)) is None

    def check_reachable(self) -> None:
        """ConfigError when even the smallest subnet breaks a budget (nothing fits)."""
        smallest = self.model.space.min()
        cost = self.cost(smallest)
        why = self.violation(cost)
        if why is not None:
            limit, key = next((lim, k) for lim, k in LIMITS if f"{self.key}.{lim}=" in why)
            raise ConfigError(
                f"{self.key}.{limit}={self.cap(limit):g} is not allowed: the smallest "
                f"subnet already has {key}={cost[key]:g}; raise it to at least that"
            )
