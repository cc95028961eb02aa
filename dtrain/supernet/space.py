"""Search-space interface: what every space (mbv3, gpt) offers.

An architecture ("arch") is a plain JSON-serialisable dict. A space knows its
elastic dimensions, samples archs from a seeded ``random.Random``, returns the
largest and smallest archs, validates an arch (one-line :class:`ArchError`
naming the bad key and the allowed values) and counts its distinct subnets.

``elastic`` arguments restrict sampling to some dimensions (the others stay at
their largest value); the progressive shrinking schedule uses it.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from typing import Iterable, Optional

from ..errors import ArchError  # noqa: F401  (re-exported: raised here)


class SearchSpace(ABC):
    """Base class of the search spaces."""

    name: str = ""
    dims: tuple = ()  # names of the elastic dimensions

    @abstractmethod
    def sample(self, rng: random.Random, elastic: Optional[Iterable[str]] = None) -> dict:
        """A random arch; dimensions outside ``elastic`` (default: all) stay at their max."""

    def max(self) -> dict:
        """The largest arch."""
        return self.min(elastic=())

    @abstractmethod
    def min(self, elastic: Optional[Iterable[str]] = None) -> dict:
        """The smallest arch; dimensions outside ``elastic`` (default: all) stay at their max."""

    @abstractmethod
    def validate(self, arch: dict) -> dict:
        """Check ``arch``; return it canonicalised (a new dict). Raise ArchError if invalid."""

    @abstractmethod
    def size(self) -> int:
        """Number of distinct subnets (archs that differ in what they compute)."""

    @abstractmethod
    def choice_table(self) -> dict:
        """arch key -> its allowed values (of each entry, for list keys), smallest first."""

    def choices(self, key: str) -> list:
        """The allowed values of one arch key; ArchError for a key the space does not have."""
        table = self.choice_table()
        if key not in table:
            raise ArchError(f"arch key {key!r} is unknown in space {self.name!r}: allowed keys are " + ", ".join(table))
        return list(table[key])

    def genes(self) -> list:
        """(key, index) of every value an arch holds, index None for scalar keys, in a fixed
        order: what evolutionary search mutates and crosses over, and what encodings read."""
        out = []
        for k, v in sorted(self.max().items()):
            out += [(k, i) for i in range(len(v))] if isinstance(v, list) else [(k, None)]
        return out

    @abstractmethod
    def within(self, arch: dict, top: dict) -> bool:
        """Whether ``arch`` lies inside ``top``: every value it runs is at most ``top``'s (fewer blocks or
        layers, narrower, smaller kernels, lower resolution), so it uses only parameters ``top`` uses (and
        the smaller-kernel transforms below them)."""

    def sample_within(self, top: dict, rng: random.Random, elastic: Optional[Iterable[str]] = None) -> dict:
        """A random arch inside ``top``: every value of an ``elastic`` dimension (default: all) drawn from
        the choices up to ``top``'s, the others at ``top``'s. (Each arch key is a dimension.)"""
        table, dims = self.choice_table(), self._elastic(elastic)
        arch = {}
        for key, value in top.items():
            choices = table[key]
            if key not in dims:
                arch[key] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list):
                arch[key] = [rng.choice([c for c in choices if c <= v]) for v in value]
            else:
                arch[key] = rng.choice([c for c in choices if c <= value])
        return self.validate(arch)

    def min_within(self, top: dict, elastic: Optional[Iterable[str]] = None) -> dict:
        """The smallest arch inside ``top``: the smallest choice on ``elastic`` dimensions (default: all),
        ``top``'s values on the others."""
        table, dims = self.choice_table(), self._elastic(elastic)
        arch = {}
        for key, value in top.items():
            smallest = table[key][0]
            if key not in dims:
                arch[key] = list(value) if isinstance(value, list) else value
            else:
                arch[key] = [smallest] * len(value) if isinstance(value, list) else smallest
        return self.validate(arch)

    def key(self, arch: dict) -> str:
        """A stable string for an arch (canonical JSON), for dedup and caches."""
        return json.dumps(self.validate(arch), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def _pick(choices, dim: str, elastic: set, rng: random.Random):
        """A random choice on an elastic dimension, else the largest value."""
        return rng.choice(choices) if dim in elastic else max(choices)

    def _elastic(self, elastic: Optional[Iterable[str]]) -> set:
        if elastic is None:
            return set(self.dims)
        chosen = set(elastic)
        unknown = chosen - set(self.dims)
        if unknown:
            raise ArchError(
                f"unknown elastic dimension {sorted(unknown)[0]!r} for space "
                f"{self.name!r}: allowed are {', '.join(self.dims)}"
            )
        return chosen


def check_keys(arch: dict, required: Iterable[str], space: str) -> None:
    """ArchError unless ``arch`` is a dict with exactly the ``required`` keys."""
    if not isinstance(arch, dict):
        raise ArchError(f"an arch must be a dict, got {type(arch).__name__}")
    required = list(required)
    for k in arch:
        if k not in required:
            raise ArchError(f"arch key {k!r} is unknown in space {space!r}: allowed keys are " + ", ".join(required))
    for k in required:
        if k not in arch:
            raise ArchError(f"arch key {k!r} is missing (space {space!r} needs " + ", ".join(required) + ")")


def check_value(key: str, value, allowed) -> None:
    """ArchError unless ``value`` is one of ``allowed`` (ints compared exactly)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value in allowed
    if not ok:
        raise ArchError(f"arch {key}={value!r} is not allowed: choose one of " + ", ".join(map(str, allowed)))


def check_list(key: str, values, length: int, allowed) -> list:
    """ArchError unless ``values`` is a list of ``length`` items each in ``allowed``."""
    if not isinstance(values, (list, tuple)) or len(values) != length:
        raise ArchError(
            f"arch {key} must be a list of {length} values from " + ", ".join(map(str, allowed)) + f", got {values!r}"
        )
    for i, v in enumerate(values):
        check_value(f"{key}[{i}]", v, allowed)
    return list(values)
