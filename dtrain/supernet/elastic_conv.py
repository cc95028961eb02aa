"""Elastic convolutions: channels and kernel size sliced out of the largest weight.

``ElasticConv2d`` (dense, groups=1): weight [out_max, in_max, k, k]; the input
width comes from the input, the output width is ``active_out``.

``ElasticDepthwiseConv2d``: weight [c_max, 1, K, K] for the largest kernel K.
A smaller kernel k is the centre k x k crop of the next larger (transformed)
kernel. With ``kernel_transform=True`` each step down applies a learned
(k*k x k*k) matrix shared by all channels, as in Once-for-All:

    W_k = reshape( crop_k(W_{k'}) . T_{k'->k}^T ),   T initialised to identity

so the small kernels can drift from being a pure crop of the large one.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .static_copy import copy_weight_bias


def centre_crop(w: torch.Tensor, k: int) -> torch.Tensor:
    big = w.shape[-1]
    s = (big - k) // 2
    return w[..., s : s + k, s : s + k]


class ElasticConv2d(nn.Module):
    def __init__(self, in_max: int, out_max: int, kernel_size: int = 1, stride: int = 1, bias: bool = False):
        super().__init__()
        self.in_max, self.out_max = in_max, out_max
        self.kernel_size, self.stride = kernel_size, stride
        self.weight = nn.Parameter(torch.empty(out_max, in_max, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_max)) if bias else None
        self.active_out = out_max
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def active_weight(self, in_ch: int):
        o = self.active_out
        if o == self.out_max and in_ch == self.in_max:
            return self.weight, self.bias
        return self.weight[:o, :in_ch], (None if self.bias is None else self.bias[:o])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.active_weight(x.shape[1])
        return F.conv2d(x, w, b, self.stride, self.kernel_size // 2)

    def to_static(self, in_ch: int) -> nn.Conv2d:
        w, b = self.active_weight(in_ch)
        m = nn.Conv2d(in_ch, self.active_out, self.kernel_size, self.stride, self.kernel_size // 2, bias=b is not None)
        return copy_weight_bias(m, w, b)


class ElasticDepthwiseConv2d(nn.Module):
    def __init__(self, channels_max: int, kernel_sizes: List[int], stride: int = 1, kernel_transform: bool = True):
        super().__init__()
        self.channels_max = channels_max
        self.kernel_sizes = sorted(kernel_sizes)
        self.max_kernel = self.kernel_sizes[-1]
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(channels_max, 1, self.max_kernel, self.max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.kernel_transform = kernel_transform
        self.transforms = nn.ParameterDict()
        if kernel_transform:
            for k in self.kernel_sizes[:-1]:
                self.transforms[f"{k}"] = nn.Parameter(torch.eye(k * k))
        self.active_kernel = self.max_kernel

    def kernel(self, channels: int, k: int) -> torch.Tensor:
        w = self.weight if channels == self.channels_max else self.weight[:channels]
        if k == self.max_kernel:
            return w
        for step in reversed(self.kernel_sizes):
            if step >= w.shape[-1] or step < k:
                continue
            w = centre_crop(w, step)
            if self.kernel_transform:
                t = self.transforms[f"{step}"]
                w = (w.reshape(channels, step * step) @ t.t()).reshape(channels, 1, step, step)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, k = x.shape[1], self.active_kernel
        return F.conv2d(x, self.kernel(c, k), None, self.stride, k // 2, 1, c)

    def to_static(self, channels: int) -> nn.Conv2d:
        k = self.active_kernel
        m = nn.Conv2d(channels, channels, k, self.stride, k // 2, groups=channels, bias=False)
        with torch.no_grad():
            m.weight.copy_(self.kernel(channels, k))
        return m

    def extra_repr(self) -> str:
        return (
            f"{self.channels_max}, kernels={self.kernel_sizes}, stride={self.stride}, "
            f"transform={self.kernel_transform}, active_kernel={self.active_kernel}"
        )


def make_divisible(v: float, divisor: int = 8, min_value: int = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going 10 % below it."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)
