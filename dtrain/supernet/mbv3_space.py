"""The MobileNetV3 search space of Once-for-All.

An arch is ``{"resolution": r, "depth": [d per stage], "kernel": [k per block],
"expand": [e per block]}`` with ``n_stages * max_depth`` block entries (stage
major). Stage s runs its first ``depth[s]`` blocks; entries of blocks it does
not run are canonicalised to the largest kernel and expand ratio, so two archs
that compute the same network have the same canonical form. The number of
distinct subnets is

    |R| * prod_s sum_{d in depths} (|K| * |E|)^d
"""

from __future__ import annotations

import random
from typing import Iterable, Optional

from .space import ArchError, SearchSpace, check_keys, check_list, check_value

KEYS = ("resolution", "depth", "kernel", "expand")


class MBV3Space(SearchSpace):
    name = "mbv3"
    dims = ("resolution", "kernel", "depth", "expand")

    def __init__(self, n_stages: int, kernel_sizes, expand_ratios, depths, resolutions):
        self.n_stages = n_stages
        self.kernel_sizes = sorted(kernel_sizes)
        self.expand_ratios = sorted(expand_ratios)
        self.depths = sorted(depths)
        self.resolutions = sorted(resolutions)
        self.max_depth = self.depths[-1]
        self.n_blocks = n_stages * self.max_depth

    @classmethod
    def from_config(cls, cfg) -> "MBV3Space":
        return cls(len(cfg.stages), cfg.kernel_sizes, cfg.expand_ratios, cfg.depths, cfg.resolutions)

    # -- helpers ------------------------------------------------------------------
    def _canonical(self, arch: dict) -> dict:
        kernel, expand = list(arch["kernel"]), list(arch["expand"])
        for s, d in enumerate(arch["depth"]):
            for i in range(d, self.max_depth):
                kernel[s * self.max_depth + i] = self.kernel_sizes[-1]
                expand[s * self.max_depth + i] = self.expand_ratios[-1]
        return {"resolution": arch["resolution"], "depth": list(arch["depth"]), "kernel": kernel, "expand": expand}

    # -- SearchSpace ------------------------------------------------------------------
    def sample(self, rng: random.Random, elastic: Optional[Iterable[str]] = None) -> dict:
        el = self._elastic(elastic)
        arch = {
            "resolution": self._pick(self.resolutions, "resolution", el, rng),
            "depth": [self._pick(self.depths, "depth", el, rng) for _ in range(self.n_stages)],
            "kernel": [self._pick(self.kernel_sizes, "kernel", el, rng) for _ in range(self.n_blocks)],
            "expand": [self._pick(self.expand_ratios, "expand", el, rng) for _ in range(self.n_blocks)],
        }
        return self._canonical(arch)

    def min(self, elastic: Optional[Iterable[str]] = None) -> dict:
        el = self._elastic(elastic)
        pick = lambda dim, c: c[0] if dim in el else c[-1]  # noqa: E731
        return self._canonical(
            {
                "resolution": pick("resolution", self.resolutions),
                "depth": [pick("depth", self.depths)] * self.n_stages,
                "kernel": [pick("kernel", self.kernel_sizes)] * self.n_blocks,
                "expand": [pick("expand", self.expand_ratios)] * self.n_blocks,
            }
        )

    def validate(self, arch: dict) -> dict:
        check_keys(arch, KEYS, self.name)
        check_value("resolution", arch["resolution"], self.resolutions)
        check_list("depth", arch["depth"], self.n_stages, self.depths)
        check_list("kernel", arch["kernel"], self.n_blocks, self.kernel_sizes)
        check_list("expand", arch["expand"], self.n_blocks, self.expand_ratios)
        return self._canonical(arch)

    def choice_table(self) -> dict:
        return {
            "resolution": self.resolutions,
            "depth": self.depths,
            "kernel": self.kernel_sizes,
            "expand": self.expand_ratios,
        }

    def size(self) -> int:
        per_block = len(self.kernel_sizes) * len(self.expand_ratios)
        per_stage = sum(per_block**d for d in self.depths)
        return len(self.resolutions) * per_stage**self.n_stages

    def within(self, arch: dict, top: dict) -> bool:
        if arch["resolution"] > top["resolution"]:
            return False
        if any(d > t for d, t in zip(arch["depth"], top["depth"])):
            return False
        return all(
            arch["kernel"][j] <= top["kernel"][j] and arch["expand"][j] <= top["expand"][j]
            for j in (s * self.max_depth + i for s, i, _, _ in self.active_blocks(arch))
        )

    def active_blocks(self, arch: dict):
        """(stage, block index within stage, kernel, expand) of every block that runs."""
        for s, d in enumerate(arch["depth"]):
            for i in range(d):
                j = s * self.max_depth + i
                yield s, i, arch["kernel"][j], arch["expand"][j]


__all__ = ["MBV3Space", "ArchError"]
