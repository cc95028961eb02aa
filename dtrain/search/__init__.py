"""After training: find the best subnets under budgets, and export them.

- ``source``: load a trained supernet (checkpoint, run dir, dtrain-sim run).
- ``genetics``: mutation, crossover and the arch encoding, for any space.
- ``pareto``: non-dominated sorting on (score up, cost down).
- ``evolution``: the evolutionary search itself (pure: scores come from a callable).
- ``predictor``: the MLP accuracy predictor and rank correlation.
- ``scorer``: BN-calibrated evaluation of candidates, spread over torchrun ranks.
- ``budget``: costs (MACs, params, latency) and constraints.
- ``latency``: latency tables of a space's blocks (``dtrain-latency``).
- ``run``: ``dtrain-search`` end to end; ``export``: ``dtrain-export``.
"""
