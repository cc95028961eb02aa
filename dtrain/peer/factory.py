"""The outer-loop component for a training config: DiLoCo, the ddp baseline, or none."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import TrainConfig
from .component import OuterComponent
from .ddp_baseline import DdpBaseline
from .diloco import DilocoLoop


def build_outer_component(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    is_leader: bool,
    world_size: int,
    distributed: bool,
    run_dir: str,
    should_stop: Callable[[], bool],
) -> Optional[OuterComponent]:
    """The component for ``outer.name``; None when the peer trains alone (``none``)."""
    if cfg.outer.name == "diloco":
        return DilocoLoop(
            cfg,
            model,
            is_leader=is_leader,
            world_size=world_size,
            distributed=distributed,
            run_dir=run_dir,
            should_stop=should_stop,
        )
    if cfg.outer.name == "ddp":
        return DdpBaseline(
            cfg,
            model,
            optimizer,
            is_leader=is_leader,
            world_size=world_size,
            distributed=distributed,
            should_stop=should_stop,
        )
    return None
