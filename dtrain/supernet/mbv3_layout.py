"""Channel widths of the MobileNetV3 supernet, derived from its config.

Shared by the supernet, its static extraction and the analytical cost model so
that the three agree on every width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from .elastic_conv import make_divisible


@dataclass(frozen=True)
class MBV3Layout:
    in_channels: int
    num_classes: int
    stem: int  # stem conv and first-block width
    stem_stride: int
    stage_widths: List[int]
    stage_strides: List[int]
    stage_acts: List[str]
    stage_se: List[bool]
    max_depth: int
    final: int  # final expand width
    feature_dim: int
    max_expand: int
    se_reduction: int

    def block_in(self, stage: int, i: int) -> int:
        """Input width of block i of a stage (the previous stage's width for i == 0)."""
        if i > 0:
            return self.stage_widths[stage]
        return self.stem if stage == 0 else self.stage_widths[stage - 1]

    def block_stride(self, stage: int, i: int) -> int:
        return self.stage_strides[stage] if i == 0 else 1

    def residual(self, stage: int, i: int) -> bool:
        return self.block_stride(stage, i) == 1 and self.block_in(stage, i) == self.stage_widths[stage]

    @staticmethod
    def mid(in_ch: int, expand: int) -> int:
        return make_divisible(round(in_ch * expand), 8)

    def se_mid(self, mid: int) -> int:
        return make_divisible(mid // self.se_reduction, 8)


def mbv3_layout(cfg) -> MBV3Layout:
    w = cfg.width_mult
    stages = cfg.stages
    last = make_divisible(stages[-1].channels * w, 8)
    return MBV3Layout(
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        stem=make_divisible(cfg.stem_channels * w, 8),
        stem_stride=cfg.stem_stride,
        stage_widths=[make_divisible(s.channels * w, 8) for s in stages],
        stage_strides=[s.stride for s in stages],
        stage_acts=[s.act for s in stages],
        stage_se=[bool(s.se) for s in stages],
        max_depth=max(cfg.depths),
        final=make_divisible(last * cfg.final_expand, 8),
        feature_dim=make_divisible(cfg.feature_dim * max(1.0, w), 8),
        max_expand=max(cfg.expand_ratios),
        se_reduction=cfg.se_reduction,
    )


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Spatial output size of a 'same'-padded convolution."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1
