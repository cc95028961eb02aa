"""Evolutionary search for the best subnets of a space under budgets.

Generation 0 is the largest and smallest subnets (always evaluated: they
anchor the plots, and are marked infeasible when over budget) plus random
feasible archs. Each later generation:

1. parents = the ``parents`` best feasible candidates so far, ordered by Pareto
   rank on (score up, cost down), then by score: the front across the whole
   cost range survives, the best-scoring arch is never lost (elitism);
2. children: ``crossover_fraction`` of them cross two random parents, the
   rest mutate one (each gene redrawn with ``mutate_prob``); only feasible
   archs never seen before are kept;
3. with the predictor on (after ``warmup`` evaluations), ``oversample`` times
   as many children are proposed and the predictor keeps those with the best
   predicted Pareto rank, then predicted score; its predictions are stored
   with the candidates, so they can be compared with the evaluations after;
4. the children are evaluated (one call, so a torchrun job spreads them).

Everything is seeded (``evolution.seed``): the same scores give the same search.
Scores come from a callable, so the algorithm is tested on toy scorers.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable, List, Optional

from .genetics import ArchEncoder, crossover, mutate
from .pareto import front_indices, pareto_ranks
from .predictor import AccuracyPredictor, spearman

log = logging.getLogger("dtrain")


@dataclasses.dataclass
class SearchResult:
    candidates: List[dict]  # every evaluated candidate, in evaluation order
    front: List[int]  # indices into candidates: the feasible Pareto front, by cost ascending
    predictor_spearman: Optional[float]  # held-out rank correlation (None: predictor off / too few)
    predictor_held_out: int


class EvolutionarySearch:
    def __init__(
        self,
        space,
        cfg,
        evaluate: Callable[[List[dict]], List[dict]],
        cost: Callable[[dict], dict],
        violation: Callable[[dict], Optional[str]],
        cost_key: str = "macs",
        predictor_cfg=None,
        on_generation: Optional[Callable[[int, List[dict]], None]] = None,
    ):
        self.space, self.cfg = space, cfg
        self.evaluate_fn, self.cost_fn, self.violation_fn = evaluate, cost, violation
        self.cost_key = cost_key
        self.pcfg = predictor_cfg if predictor_cfg is not None and predictor_cfg.enabled else None
        self.on_generation = on_generation
        self.rng = random.Random(cfg.seed)
        self.candidates: List[dict] = []
        self.seen: set = set()
        self.encoder = ArchEncoder(space) if self.pcfg else None

    # -- helpers --------------------------------------------------------------------------
    def _feasible(self, arch: dict) -> bool:
        return self.violation_fn(self.cost_fn(arch)) is None

    def _evaluate(self, archs: List[dict], generation: int, roles=None, predicted=None) -> None:
        if not archs:
            return
        results = self.evaluate_fn(archs)
        for j, (arch, res) in enumerate(zip(archs, results)):
            cost = self.cost_fn(arch)
            self.candidates.append(
                {
                    "arch": arch,
                    "key": self.space.key(arch),
                    "generation": generation,
                    "score": float(res["score"]),
                    "metrics": {k: v for k, v in res.items() if k != "score"},
                    "cost": cost,
                    "feasible": self.violation_fn(cost) is None,
                    "role": roles[j] if roles else "",
                    "predicted": predicted[j] if predicted else None,
                }
            )
            self.seen.add(self.space.key(arch))
        if self.on_generation is not None:
            self.on_generation(generation, self.candidates)

    def _select(self, cands: List[dict], k: int, score_key: str = "score") -> List[dict]:
        pts = [(c[score_key], c["cost"][self.cost_key]) for c in cands]
        ranks = pareto_ranks(pts)
        order = sorted(range(len(cands)), key=lambda i: (ranks[i], -pts[i][0], cands[i]["key"]))
        return [cands[i] for i in order[:k]]

    def _parents(self, feasible: List[dict], k: int) -> List[dict]:
        """Half the parents are the best scores (they push the top of the front up), the
        rest the best by Pareto rank among the others (they keep the cheap end alive)."""
        best = sorted(feasible, key=lambda c: (-c["score"], c["key"]))[: (k + 1) // 2]
        keys = {c["key"] for c in best}
        return best + self._select([c for c in feasible if c["key"] not in keys], k - len(best))

    def _random_feasible(self, n: int) -> List[dict]:
        out, keys, tries = [], set(), 0
        while len(out) < n and tries < 50 * max(n, 1):
            tries += 1
            arch = self.space.sample(self.rng)
            key = self.space.key(arch)
            if key not in self.seen and key not in keys and self._feasible(arch):
                out.append(arch)
                keys.add(key)
        return out

    def _children(self, parents: List[dict], n: int) -> List[dict]:
        out, keys, tries = [], set(), 0
        n_cross = round(n * self.cfg.crossover_fraction) if len(parents) >= 2 else 0
        while len(out) < n and tries < 50 * max(n, 1):
            tries += 1
            if len(out) < n_cross:
                a, b = self.rng.sample(parents, 2)
                child = crossover(self.space, a["arch"], b["arch"], self.rng)
            else:
                # linear ranking: parent i of k drawn with weight k - i (the best score most often)
                parent = self.rng.choices(parents, weights=range(len(parents), 0, -1))[0]
                child = mutate(self.space, parent["arch"], self.cfg.mutate_prob, self.rng)
            key = self.space.key(child)
            if key in self.seen or key in keys or not self._feasible(child):
                continue
            out.append(child)
            keys.add(key)
        return out

    def _predict_and_pick(self, children: List[dict], n: int):
        evaluated = self.candidates
        pred = AccuracyPredictor(self.encoder.dim, self.pcfg.hidden, self.pcfg.epochs, self.pcfg.lr, self.pcfg.seed)
        pred.fit(self.encoder.encode([c["arch"] for c in evaluated]), [c["score"] for c in evaluated])
        scores = pred.predict(self.encoder.encode(children))
        proposals = [
            {"arch": a, "key": self.space.key(a), "pred": s, "cost": self.cost_fn(a)} for a, s in zip(children, scores)
        ]
        kept = self._select(proposals, n, score_key="pred")
        return [p["arch"] for p in kept], [p["pred"] for p in kept]

    # -- the search -------------------------------------------------------------------------
    def run(self) -> SearchResult:
        cfg = self.cfg
        anchors = [self.space.max(), self.space.min()]
        anchors = [
            a for i, a in enumerate(anchors) if self.space.key(a) not in {self.space.key(b) for b in anchors[:i]}
        ]
        roles = ["largest", "smallest"][: len(anchors)]
        for a in anchors:
            self.seen.add(self.space.key(a))
        n_feasible_anchors = sum(self._feasible(a) for a in anchors)
        first = self._random_feasible(max(0, cfg.population - n_feasible_anchors))
        self._evaluate(anchors + first, 0, roles=roles + [""] * len(first))
        for gen in range(1, cfg.generations):
            feasible = [c for c in self.candidates if c["feasible"]]
            if not feasible:
                break
            parents = self._parents(feasible, cfg.parents)
            use_pred = self.pcfg is not None and len(self.candidates) >= self.pcfg.warmup
            want = cfg.population * (self.pcfg.oversample if use_pred else 1)
            children = self._children(parents, want)
            if len(children) < want:
                children += self._random_feasible(want - len(children))
            if not children:
                log.info("search: no new feasible arch left to try after generation %d", gen - 1)
                break
            predicted = None
            if use_pred:
                children, predicted = self._predict_and_pick(children, cfg.population)
            self._evaluate(children, gen, predicted=predicted)
        return self._result()

    def _result(self) -> SearchResult:
        feas = [i for i, c in enumerate(self.candidates) if c["feasible"]]
        pts = [(self.candidates[i]["score"], self.candidates[i]["cost"][self.cost_key]) for i in feas]
        front = [feas[j] for j in front_indices(pts)]
        held = [c for c in self.candidates if c["predicted"] is not None]
        rho = spearman([c["predicted"] for c in held], [c["score"] for c in held]) if held else None
        return SearchResult(self.candidates, front, rho, len(held))
