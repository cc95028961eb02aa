"""Evolutionary search, Pareto sorting, predictor and genetics on toy scorers (no training)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import ConfigError, EvolutionConfig, PredictorConfig
from dtrain.search.evolution import EvolutionarySearch
from dtrain.search.genetics import ArchEncoder, crossover, mutate
from dtrain.search.pareto import dominates, front_indices, pareto_ranks
from dtrain.search.predictor import AccuracyPredictor, spearman
from dtrain.supernet.gpt_space import GPTSpace
from dtrain.supernet.mbv3_space import MBV3Space

SPACE = MBV3Space(n_stages=3, kernel_sizes=[3, 5], expand_ratios=[2, 3], depths=[1, 2], resolutions=[8, 12])


def _genes(arch):
    return [arch[k] if i is None else arch[k][i] for k, i in SPACE.genes()]


def toy_scorer(target):
    """1 minus the mean distance of each gene's choice index to the target's: a unique
    optimum (1.0) at the target, smooth around it."""
    want = [SPACE.choices(k).index(v) for (k, _), v in zip(SPACE.genes(), _genes(target))]

    def one(x):
        got = [SPACE.choices(k).index(v) for (k, _), v in zip(SPACE.genes(), _genes(x))]
        return 1.0 - sum(abs(a - b) for a, b in zip(got, want)) / (2.0 * len(want))

    return lambda archs: [{"score": one(x), "acc": 0.0, "loss": 0.0} for x in archs]


def toy_cost(arch):
    macs = arch["resolution"] ** 2 * sum(k * e for _, _, k, e in SPACE.active_blocks(arch))
    return {"macs": macs, "params": sum(arch["depth"]), "latency_ms": None}


def test_finds_the_known_best_arch_on_a_toy_scorer():
    target = SPACE.validate(SPACE.sample(random.Random(7)))
    cfg = EvolutionConfig(population=24, generations=25, parents=8, mutate_prob=0.1, seed=1)
    res = EvolutionarySearch(SPACE, cfg, toy_scorer(target), toy_cost, lambda c: None).run()
    best = max(res.candidates, key=lambda c: c["score"])
    assert best["key"] == SPACE.key(target) and best["score"] == 1.0
    assert len(res.candidates) <= SPACE.size() / 20  # found, not enumerated
    # the best arch is on the front (elitism); the front is sorted by cost, score rising with it
    front = [res.candidates[i] for i in res.front]
    assert SPACE.key(target) in {c["key"] for c in front}
    costs, scores = [c["cost"]["macs"] for c in front], [c["score"] for c in front]
    assert costs == sorted(costs) and scores == sorted(scores)


def test_same_seed_same_search_and_budget_respected():
    target = SPACE.sample(random.Random(3))
    cap = toy_cost(SPACE.max())["macs"] // 3
    violation = lambda c: None if c["macs"] <= cap else "over"  # noqa: E731
    cfg = EvolutionConfig(population=10, generations=4, parents=4, seed=5)
    runs = [EvolutionarySearch(SPACE, cfg, toy_scorer(target), toy_cost, violation).run() for _ in range(2)]
    assert [c["key"] for c in runs[0].candidates] == [c["key"] for c in runs[1].candidates]
    cands = runs[0].candidates
    # only the largest subnet (always evaluated as an anchor) may be over budget
    over = [c for c in cands if not c["feasible"]]
    assert [c["role"] for c in over] == ["largest"]
    assert all(cands[i]["cost"]["macs"] <= cap for i in runs[0].front)
    assert len({c["key"] for c in cands}) == len(cands)  # nothing evaluated twice


def test_predictor_guides_search_and_reports_held_out_rank_correlation():
    target = SPACE.sample(random.Random(11))
    cfg = EvolutionConfig(population=12, generations=5, parents=6, seed=2)
    pcfg = PredictorConfig(enabled=True, hidden=32, epochs=150, warmup=12, oversample=4)
    res = EvolutionarySearch(SPACE, cfg, toy_scorer(target), toy_cost, lambda c: None, predictor_cfg=pcfg).run()
    assert res.predictor_held_out == 12 * 4  # generations 1..4 were chosen by the predictor
    assert res.predictor_spearman is not None and res.predictor_spearman > 0.5
    assert all(c["predicted"] is None for c in res.candidates if c["generation"] == 0)


def test_space_exhausted_stops_early():
    tiny = GPTSpace(depths=[1], embed_dims=[8], heads=[1, 2], mlp_ratios=[1])  # 2 archs in all
    score = lambda archs: [{"score": float(a["heads"][0]), "acc": 0.0, "loss": 0.0} for a in archs]  # noqa: E731
    cost = lambda a: {"macs": a["heads"][0], "params": 1, "latency_ms": None}  # noqa: E731
    res = EvolutionarySearch(
        tiny, EvolutionConfig(population=4, generations=5, parents=2), score, cost, lambda c: None
    ).run()
    assert len(res.candidates) == 2 and len(res.front) == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=40))
def test_pareto_ranks_are_non_dominated_sorting(points):
    ranks = pareto_ranks(points)
    for i, p in enumerate(points):
        # nothing in the same or a later rank dominates p; something in the rank before does
        assert not any(dominates(q, p) for j, q in enumerate(points) if ranks[j] >= ranks[i])
        if ranks[i] > 0:
            assert any(dominates(q, p) for j, q in enumerate(points) if ranks[j] == ranks[i] - 1)
    front = front_indices(points)
    assert sorted(front) == sorted(i for i, r in enumerate(ranks) if r == 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_children_are_valid_canonical_archs(seed, prob):
    rng = random.Random(seed)
    a, b = SPACE.sample(rng), SPACE.sample(rng)
    for child in (mutate(SPACE, a, prob, rng), crossover(SPACE, a, b, rng)):
        assert SPACE.validate(child) == child
    assert crossover(SPACE, a, a, rng) == a  # crossover only takes what a parent has
    assert mutate(SPACE, a, 1e-9, rng) != a  # a mutation always changes something
    enc = ArchEncoder(SPACE).encode([a, b])
    assert enc.shape == (2, ArchEncoder(SPACE).dim) and enc.sum(1).tolist() == [len(SPACE.genes())] * 2


def test_spearman_and_predictor_fit():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    rng = random.Random(0)
    archs = [SPACE.sample(rng) for _ in range(60)]
    y = [toy_cost(a)["macs"] / 1000.0 for a in archs]
    enc = ArchEncoder(SPACE).encode(archs)
    p = AccuracyPredictor(enc.shape[1], 32, 300, 0.01, seed=0)
    p.fit(enc[:40], y[:40])
    assert spearman(p.predict(enc[40:]), y[40:]) > 0.7
    again = AccuracyPredictor(enc.shape[1], 32, 300, 0.01, seed=0)
    again.fit(enc[:40], y[:40])
    assert again.predict(enc[40:]) == p.predict(enc[40:])  # seeded: the same predictor every time


def test_config_checks_are_one_line():
    with pytest.raises(ConfigError, match=r"evolution.parents=9 is not allowed"):
        EvolutionConfig(population=8, parents=9)
    with pytest.raises(ConfigError, match="constraints.latency_table"):
        from dtrain.config import ConstraintsConfig

        ConstraintsConfig(max_latency_ms=2.0)
