"""Static MobileNetV3 networks built from plain torch layers.

``extract`` on the mbv3 supernet fills these with copied weights. They hold no
elastic logic, script with TorchScript, and load without dtrain installed once
scripted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def act_layer(name: str) -> nn.Module:
    return nn.ReLU(inplace=False) if name == "relu" else nn.Hardswish()


class SqueezeExcite(nn.Module):
    def __init__(self, reduce: nn.Linear, expand: nn.Linear):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        s = F.hardsigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s[:, :, None, None]


class InvertedResidual(nn.Module):
    """expand (1x1) -> depthwise -> [SE] -> project (1x1), with a skip when shapes match."""

    def __init__(self, expand: nn.Module, depthwise: nn.Module, se: nn.Module, project: nn.Module, residual: bool):
        super().__init__()
        self.expand, self.depthwise, self.se, self.project = expand, depthwise, se, project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(self.se(self.depthwise(self.expand(x))))
        if self.residual:
            h = h + x
        return h


class StaticMBV3(nn.Module):
    def __init__(
        self,
        stem: nn.Module,
        first: nn.Module,
        blocks: nn.Sequential,
        final: nn.Module,
        feature_mix: nn.Linear,
        classifier: nn.Linear,
        dropout: float,
        resolution: int,
    ):
        super().__init__()
        self.stem, self.first, self.blocks, self.final = stem, first, blocks, final
        self.feature_mix, self.classifier = feature_mix, classifier
        self.dropout = nn.Dropout(dropout)
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final(self.blocks(self.first(self.stem(x))))
        h = F.hardswish(self.feature_mix(h.mean((2, 3))))
        return self.classifier(self.dropout(h))


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "") -> nn.Sequential:
    layers = [conv, bn]
    if act:
        layers.append(act_layer(act))
    return nn.Sequential(*layers)
