"""Copying active slices of elastic parameters into plain torch layers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def copy_weight_bias(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """Copy ``weight`` (and ``bias`` when given) into ``module``'s parameters; returns it."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module
