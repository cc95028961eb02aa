"""Mutation, crossover and encoding of archs, for any search space.

An arch is a list of genes (``space.genes()``: one per scalar key and one per
entry of each list key). Mutation redraws each gene with probability p from
the key's choices (and changes one gene of a running block when that changed
nothing); crossover takes each gene from one parent or the other with
equal odds. Children are canonicalised by the space (entries of blocks that do
not run are reset), so equivalent archs compare equal.

The encoding is one one-hot group per gene, in gene order: what the accuracy
predictor reads.
"""

from __future__ import annotations

import copy
import random
from typing import List

import torch


def _get(arch: dict, gene):
    key, i = gene
    return arch[key] if i is None else arch[key][i]


def _set(arch: dict, gene, value) -> None:
    key, i = gene
    if i is None:
        arch[key] = value
    else:
        arch[key][i] = value


def mutate(space, arch: dict, prob: float, rng: random.Random) -> dict:
    """A copy of ``arch`` with each gene redrawn with probability ``prob``; when that
    changes nothing, one random gene that matters is set to another value (a local step)."""
    child = copy.deepcopy(arch)
    genes = space.genes()
    for gene in genes:
        if rng.random() < prob:
            _set(child, gene, rng.choice(space.choices(gene[0])))
    child = space.validate(child)
    if child == arch:  # a gene of a block that runs (changes of the others are canonicalised away)
        for gene in rng.sample(genes, len(genes)):
            others = [v for v in space.choices(gene[0]) if v != _get(arch, gene)]
            if not others:
                continue
            step = copy.deepcopy(arch)
            _set(step, gene, rng.choice(others))
            step = space.validate(step)
            if step != arch:
                return step
    return child


def crossover(space, a: dict, b: dict, rng: random.Random) -> dict:
    """Each gene from ``a`` or ``b`` with equal odds."""
    child = copy.deepcopy(a)
    for gene in space.genes():
        if rng.random() < 0.5:
            _set(child, gene, _get(b, gene))
    return space.validate(child)


class ArchEncoder:
    """One-hot encoding of archs of one space (float32 vectors of fixed length)."""

    def __init__(self, space):
        self.space = space
        self.genes = space.genes()
        self.offsets, n = [], 0
        self.choice_index = {}
        for key, _ in self.genes:
            if key not in self.choice_index:
                self.choice_index[key] = {v: j for j, v in enumerate(space.choices(key))}
            self.offsets.append(n)
            n += len(self.choice_index[key])
        self.dim = n

    def encode(self, archs: List[dict]) -> torch.Tensor:
        out = torch.zeros(len(archs), self.dim)
        for row, arch in enumerate(archs):
            for gene, off in zip(self.genes, self.offsets):
                out[row, off + self.choice_index[gene[0]][_get(arch, gene)]] = 1.0
        return out
