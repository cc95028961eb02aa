"""Stochastic depth: drop whole samples of a residual branch.

    y = x * m / (1 - p),   m ~ Bernoulli(1 - p) per sample

so the branch keeps its expected value. Used only on the largest subnet.
"""

from __future__ import annotations

import torch


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep
