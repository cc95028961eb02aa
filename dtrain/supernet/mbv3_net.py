"""The MobileNetV3 supernet (Once-for-All): elastic kernel, expand, depth, resolution.

Layout: stem conv -> fixed first block (expand 1, kernel 3) -> stages of elastic
inverted-residual blocks (stage s runs its first d_s blocks) -> final 1x1
expand -> global pool -> feature mix -> dropout -> classifier. Every weight is
allocated at its largest size; the active subnet slices it. Dropout and
drop-path act only inside ``regularized()`` (the largest subnet, as in BigNAS);
the last BN of every residual block starts with gamma = 0.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import activations as act
from . import static_mbv3 as S
from .base import Supernet
from .drop_path import drop_path
from .elastic_conv import ElasticConv2d, ElasticDepthwiseConv2d
from .elastic_linear import ElasticLinear
from .elastic_norm import ElasticBatchNorm2d
from .mbv3_cost import mbv3_cost
from .mbv3_layout import mbv3_layout
from .mbv3_space import MBV3Space


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    return act.relu(x) if name == "relu" else act.hardswish(x)


class ElasticSE(nn.Module):
    def __init__(self, channels_max: int, mid_max: int):
        super().__init__()
        self.reduce = ElasticLinear(channels_max, mid_max)
        self.expand = ElasticLinear(mid_max, channels_max)

    def set_width(self, channels: int, mid: int) -> None:
        self.reduce.active_out, self.expand.active_out = mid, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        s = act.hardsigmoid(self.expand(act.relu(self.reduce(s))))
        return x * s[:, :, None, None]

    def to_static(self, channels: int) -> S.SqueezeExcite:
        mid = self.reduce.active_out
        return S.SqueezeExcite(self.reduce.to_static(channels), self.expand.to_static(mid))


class ElasticMBConv(nn.Module):
    """Inverted residual block with elastic kernel size and expand ratio."""

    def __init__(self, layout, stage: int, index: int, cfg):
        super().__init__()
        self.layout = layout
        self.in_ch = layout.block_in(stage, index)
        self.out_ch = layout.stage_widths[stage]
        self.act = layout.stage_acts[stage]
        self.residual = layout.residual(stage, index)
        stride = layout.block_stride(stage, index)
        mid_max = layout.mid(self.in_ch, layout.max_expand)
        eps, mom = cfg.bn_eps, cfg.bn_momentum
        self.has_expand = layout.max_expand > 1
        if self.has_expand:
            self.expand_conv = ElasticConv2d(self.in_ch, mid_max, 1)
            self.expand_bn = ElasticBatchNorm2d(mid_max, eps, mom)
        self.dw = ElasticDepthwiseConv2d(mid_max, cfg.kernel_sizes, stride, cfg.kernel_transform)
        self.dw_bn = ElasticBatchNorm2d(mid_max, eps, mom)
        self.se = ElasticSE(mid_max, layout.se_mid(mid_max)) if layout.stage_se[stage] else None
        self.project = ElasticConv2d(mid_max, self.out_ch, 1)
        self.project_bn = ElasticBatchNorm2d(self.out_ch, eps, mom)
        if self.residual:
            nn.init.zeros_(self.project_bn.weight)
        self.drop_path_rate = 0.0
        self.set_arch(max(cfg.kernel_sizes), layout.max_expand)

    def set_arch(self, kernel: int, expand: int) -> None:
        mid = self.layout.mid(self.in_ch, expand) if self.has_expand else self.in_ch
        if self.has_expand:
            self.expand_conv.active_out = mid
        self.dw.active_kernel = kernel
        if self.se is not None:
            self.se.set_width(mid, self.layout.se_mid(mid))

    def forward(self, x: torch.Tensor, regularize: bool) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = _act(self.expand_bn(self.expand_conv(h)), self.act)
        h = _act(self.dw_bn(self.dw(h)), self.act)
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project(h))
        if self.residual:
            if regularize and self.drop_path_rate > 0:
                h = drop_path(h, self.drop_path_rate)
            h = h + x
        return h

    def to_static(self) -> S.InvertedResidual:
        mid = self.expand_conv.active_out if self.has_expand else self.in_ch
        expand = nn.Identity()
        if self.has_expand:
            expand = S.conv_bn_act(self.expand_conv.to_static(self.in_ch), self.expand_bn.to_static(mid), self.act)
        dw = S.conv_bn_act(self.dw.to_static(mid), self.dw_bn.to_static(mid), self.act)
        se = self.se.to_static(mid) if self.se is not None else nn.Identity()
        project = S.conv_bn_act(self.project.to_static(mid), self.project_bn.to_static(self.out_ch))
        return S.InvertedResidual(expand, dw, se, project, self.residual)


class MBV3Supernet(Supernet):
    task = "classification"

    def __init__(self, cfg):
        space = MBV3Space.from_config(cfg)
        super().__init__(space)
        self.cfg = cfg
        L = self.layout = mbv3_layout(cfg)
        eps, mom = cfg.bn_eps, cfg.bn_momentum
        self.stem_conv = nn.Conv2d(L.in_channels, L.stem, 3, L.stem_stride, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(L.stem, eps=eps, momentum=mom)
        # first block: depthwise 3x3 + pointwise, expand 1, fixed (as in Once-for-All)
        self.first_dw = nn.Conv2d(L.stem, L.stem, 3, 1, 1, groups=L.stem, bias=False)
        self.first_dw_bn = nn.BatchNorm2d(L.stem, eps=eps, momentum=mom)
        self.first_pw = nn.Conv2d(L.stem, L.stem, 1, bias=False)
        self.first_pw_bn = nn.BatchNorm2d(L.stem, eps=eps, momentum=mom)
        nn.init.zeros_(self.first_pw_bn.weight)
        self.blocks = nn.ModuleList(
            ElasticMBConv(L, s, i, cfg) for s in range(len(L.stage_widths)) for i in range(L.max_depth)
        )
        n = len(self.blocks)
        for j, b in enumerate(self.blocks):  # stochastic depth grows linearly with depth
            b.drop_path_rate = cfg.drop_path * (j + 1) / n
        self.final_conv = nn.Conv2d(L.stage_widths[-1], L.final, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(L.final, eps=eps, momentum=mom)
        self.feature_mix = nn.Linear(L.final, L.feature_dim, bias=False)
        self.classifier = nn.Linear(L.feature_dim, L.num_classes)
        for m in (self.stem_conv, self.first_dw, self.first_pw, self.final_conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        self._run: list = []
        # channels-last: depthwise convolutions (above all their weight gradients)
        # run several times faster on CPU, and cuDNN prefers it as well
        self.to(memory_format=torch.channels_last)
        self.set_active(self.space.max())

    # -- arch -----------------------------------------------------------------------
    def _apply_arch(self, arch: dict) -> None:
        md = self.layout.max_depth
        self._run = []
        for s, i, k, e in self.space.active_blocks(arch):
            block = self.blocks[s * md + i]
            block.set_arch(k, e)
            self._run.append(block)

    def teacher_needs_extra_forward(self) -> bool:
        return self.cfg.drop_path > 0

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        r = (self._active or self.active_arch)["resolution"]
        return resize(x, r).contiguous(memory_format=torch.channels_last)

    # -- forward --------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        reg = self.regularizing
        h = _act(self.stem_bn(self.stem_conv(x)), self.cfg.stem_act)
        h = h + self.first_pw_bn(self.first_pw(act.relu(self.first_dw_bn(self.first_dw(h)))))
        for block in self._run:
            h = block(h, reg)
        h = act.hardswish(self.final_bn(self.final_conv(h)))
        return act.hardswish(self.feature_mix(h.mean((2, 3))))

    def forward(self, x: torch.Tensor, return_clean: bool = False):
        feat = self.features(x)
        p = self.cfg.dropout if self.regularizing else 0.0
        logits = self.classifier(F.dropout(feat, p, training=True) if p > 0 else feat)
        if not return_clean:
            return logits
        if self.regularizing and self.teacher_needs_extra_forward():
            raise RuntimeError("drop-path is on: the clean teacher needs its own forward pass")
        if p > 0:
            with torch.no_grad():
                clean = self.classifier(feat.detach())
        else:
            clean = logits.detach()
        return logits, clean

    # -- extraction and cost ----------------------------------------------------------
    def _extract_active(self) -> S.StaticMBV3:
        arch = self.active_arch
        copy = _clone_module
        stem = nn.Sequential(copy(self.stem_conv), copy(self.stem_bn), S.act_layer(self.cfg.stem_act))
        first = S.InvertedResidual(
            nn.Identity(),
            nn.Sequential(copy(self.first_dw), copy(self.first_dw_bn), nn.ReLU()),
            nn.Identity(),
            nn.Sequential(copy(self.first_pw), copy(self.first_pw_bn)),
            True,
        )
        blocks = nn.Sequential(*[b.to_static() for b in self._run])
        final = nn.Sequential(copy(self.final_conv), copy(self.final_bn), nn.Hardswish())
        net = S.StaticMBV3(
            stem,
            first,
            blocks,
            final,
            copy(self.feature_mix),
            copy(self.classifier),
            self.cfg.dropout,
            arch["resolution"],
        )
        net.train(self.training)
        return net.to(memory_format=torch.channels_last)

    def cost(self, arch: dict) -> dict:
        return mbv3_cost(self.layout, self.space, self.space.validate(arch))


def resize(x: torch.Tensor, r: int) -> torch.Tensor:
    """Bilinear resize of an image batch to r x r (antialiased when shrinking)."""
    if x.shape[-1] == r and x.shape[-2] == r:
        return x
    return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=r < x.shape[-1])


def _clone_module(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)
