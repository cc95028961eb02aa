"""Accuracy predictor: a small MLP from the arch encoding to the score.

Trained from scratch (seeded, full batch, Adam, mean-squared error on
standardised scores) on every candidate evaluated so far. The search asks it
to rank children before they are evaluated; comparing those predictions with
the evaluations that follow gives an honest held-out rank correlation
(Spearman's rho, ties averaged):

    rho = pearson(rank(predicted), rank(measured))
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn


class AccuracyPredictor:
    def __init__(self, dim: int, hidden: int, epochs: int, lr: float, seed: int):
        self.dim, self.hidden, self.epochs, self.lr, self.seed = dim, hidden, epochs, lr, seed
        self.net: Optional[nn.Module] = None
        self.mean, self.std = 0.0, 1.0

    def fit(self, x: torch.Tensor, y: Sequence[float]) -> float:
        """Train on encodings ``x`` and scores ``y``; returns the final training MSE."""
        t = torch.tensor(list(y), dtype=torch.float32)
        self.mean, self.std = float(t.mean()), float(t.std()) if len(t) > 1 and float(t.std()) > 0 else 1.0
        t = (t - self.mean) / self.std
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(
                nn.Linear(self.dim, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, 1),
            )
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        loss = torch.zeros(())
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = ((self.net(x).squeeze(1) - t) ** 2).mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> List[float]:
        if self.net is None:
            raise RuntimeError("predict() before fit()")
        return (self.net(x).squeeze(1) * self.std + self.mean).tolist()


def _ranks(values: Sequence[float]) -> List[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation; None with fewer than 3 pairs or a constant side."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5
