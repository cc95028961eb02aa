"""The search space of the GPT supernet: elastic depth, embedding width, heads, MLP ratio.

An arch is ``{"depth": d, "embed": e, "heads": [h per layer], "mlp_ratio":
[r per layer]}`` with per-layer lists of length ``max_depth``. The network runs
its first ``d`` layers at embedding width ``e``; layer i has ``heads[i]``
attention heads (of the fixed head dim) and an MLP of hidden width
``mlp_ratio[i] * e``. Entries of layers that do not run are canonicalised to the
largest head count and MLP ratio, so two archs that compute the same network
have the same canonical form. The number of distinct subnets is

    |E| * sum_{d in depths} (|H| * |R|)^d
"""

from __future__ import annotations

import random
from typing import Iterable, Optional

from .space import ArchError, SearchSpace, check_keys, check_list, check_value

KEYS = ("depth", "embed", "heads", "mlp_ratio")


class GPTSpace(SearchSpace):
    name = "gpt"
    dims = ("depth", "embed", "heads", "mlp_ratio")

    def __init__(self, depths, embed_dims, heads, mlp_ratios):
        self.depths = sorted(depths)
        self.embed_dims = sorted(embed_dims)
        self.heads = sorted(heads)
        self.mlp_ratios = sorted(mlp_ratios)
        self.max_depth = self.depths[-1]

    @classmethod
    def from_config(cls, cfg) -> "GPTSpace":
        return cls(cfg.depths, cfg.embed_dims, cfg.heads, cfg.mlp_ratios)

    # -- helpers ------------------------------------------------------------------
    def _canonical(self, arch: dict) -> dict:
        heads, ratios = list(arch["heads"]), list(arch["mlp_ratio"])
        for i in range(arch["depth"], self.max_depth):
            heads[i] = self.heads[-1]
            ratios[i] = self.mlp_ratios[-1]
        return {"depth": arch["depth"], "embed": arch["embed"], "heads": heads, "mlp_ratio": ratios}

    # -- SearchSpace ------------------------------------------------------------------
    def sample(self, rng: random.Random, elastic: Optional[Iterable[str]] = None) -> dict:
        el = self._elastic(elastic)
        n = self.max_depth
        arch = {
            "depth": self._pick(self.depths, "depth", el, rng),
            "embed": self._pick(self.embed_dims, "embed", el, rng),
            "heads": [self._pick(self.heads, "heads", el, rng) for _ in range(n)],
            "mlp_ratio": [self._pick(self.mlp_ratios, "mlp_ratio", el, rng) for _ in range(n)],
        }
        return self._canonical(arch)

    def min(self, elastic: Optional[Iterable[str]] = None) -> dict:
        el = self._elastic(elastic)
        pick = lambda dim, c: c[0] if dim in el else c[-1]  # noqa: E731
        return self._canonical(
            {
                "depth": pick("depth", self.depths),
                "embed": pick("embed", self.embed_dims),
                "heads": [pick("heads", self.heads)] * self.max_depth,
                "mlp_ratio": [pick("mlp_ratio", self.mlp_ratios)] * self.max_depth,
            }
        )

    def validate(self, arch: dict) -> dict:
        check_keys(arch, KEYS, self.name)
        check_value("depth", arch["depth"], self.depths)
        check_value("embed", arch["embed"], self.embed_dims)
        check_list("heads", arch["heads"], self.max_depth, self.heads)
        check_list("mlp_ratio", arch["mlp_ratio"], self.max_depth, self.mlp_ratios)
        return self._canonical(arch)

    def choice_table(self) -> dict:
        return {"depth": self.depths, "embed": self.embed_dims, "heads": self.heads, "mlp_ratio": self.mlp_ratios}

    def size(self) -> int:
        per_layer = len(self.heads) * len(self.mlp_ratios)
        return len(self.embed_dims) * sum(per_layer**d for d in self.depths)

    def within(self, arch: dict, top: dict) -> bool:
        if arch["depth"] > top["depth"] or arch["embed"] > top["embed"]:
            return False
        return all(h <= top["heads"][i] and r <= top["mlp_ratio"][i] for i, h, r in self.active_layers(arch))

    def active_layers(self, arch: dict):
        """(layer index, heads, mlp_ratio) of every layer that runs."""
        for i in range(arch["depth"]):
            yield i, arch["heads"][i], arch["mlp_ratio"][i]


__all__ = ["GPTSpace", "ArchError"]
