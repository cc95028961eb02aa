"""Elastic normalisation: batch norm and layer norm over the first c channels.

``ElasticBatchNorm2d`` keeps affine parameters and running statistics at the
largest width and slices both to the input's channel count, so the running
statistics of a slice are updated in place. ``momentum=None`` turns the running
statistics into a cumulative average (used by BN recalibration):

    m_n = m_{n-1} + (x_n - m_{n-1}) / n

``ElasticLayerNorm`` normalises over the input's last dimension e and uses
weight[:e], bias[:e].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .static_copy import copy_weight_bias


class ElasticBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _sliced(self, c: int):
        if c == self.num_features:
            return self.weight, self.bias, self.running_mean, self.running_var
        return self.weight[:c], self.bias[:c], self.running_mean[:c], self.running_var[:c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, rm, rv = self._sliced(x.shape[1])
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, rm, rv, w, b, self.training, factor, self.eps)

    def to_static(self, c: int) -> nn.BatchNorm2d:
        w, b, rm, rv = self._sliced(c)
        m = nn.BatchNorm2d(c, eps=self.eps, momentum=self.momentum if self.momentum is not None else 0.1)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(self.num_batches_tracked)
        return m

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ElasticLayerNorm(nn.Module):
    def __init__(self, dim_max: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim_max = dim_max
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim_max))
        self.bias = nn.Parameter(torch.zeros(dim_max)) if bias else None

    def _sliced(self, e: int):
        if e == self.dim_max:
            return self.weight, self.bias
        return self.weight[:e], (None if self.bias is None else self.bias[:e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x.shape[-1]
        w, b = self._sliced(e)
        return F.layer_norm(x, (e,), w, b, self.eps)

    def to_static(self, e: int) -> nn.LayerNorm:
        w, b = self._sliced(e)
        return copy_weight_bias(nn.LayerNorm(e, eps=self.eps, bias=b is not None), w, b)

    def extra_repr(self) -> str:
        return f"{self.dim_max}, eps={self.eps}"
