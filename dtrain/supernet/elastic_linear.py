"""Elastic linear layer: weight allocated at [out_max, in_max], sliced at run time.

The active input width is read off the input's last dimension; the active
output width is ``active_out`` (set by the owning supernet). y = x W[:o, :i]^T + b[:o].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .static_copy import copy_weight_bias


class ElasticLinear(nn.Module):
    def __init__(self, in_max: int, out_max: int, bias: bool = True):
        super().__init__()
        self.in_max, self.out_max = in_max, out_max
        self.weight = nn.Parameter(torch.empty(out_max, in_max))
        self.bias = nn.Parameter(torch.zeros(out_max)) if bias else None
        self.active_out = out_max
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_max)
            nn.init.uniform_(self.bias, -bound, bound)

    def active_weight(self, in_features: int):
        o = self.active_out
        w = self.weight if (o == self.out_max and in_features == self.in_max) else self.weight[:o, :in_features]
        b = None if self.bias is None else (self.bias if o == self.out_max else self.bias[:o])
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.active_weight(x.shape[-1])
        return F.linear(x, w, b)

    def to_static(self, in_features: int) -> nn.Linear:
        w, b = self.active_weight(in_features)
        return copy_weight_bias(nn.Linear(in_features, self.active_out, bias=b is not None), w, b)

    def extra_repr(self) -> str:
        return f"in_max={self.in_max}, out_max={self.out_max}, active_out={self.active_out}"
