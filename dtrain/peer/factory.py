"""The outer-loop component for a training config: DiLoCo, the ddp baseline, or none."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..config import TrainConfig
from ..supernet.base import Supernet
from .component import OuterComponent
from .ddp_baseline import DdpBaseline
from .diloco import DilocoLoop


def build_outer_component(
    cfg: TrainConfig,
    model: Supernet,
    optimizer: torch.optim.Optimizer,
    *,
    is_leader: bool,
    world_size: int,
    distributed: bool,
    run_dir: str,
    should_stop: Callable[[], bool],
    ladder: Optional[List[Optional[dict]]] = None,
    slice_masks: Optional[Dict[str, torch.Tensor]] = None,
) -> Optional[OuterComponent]:
    """The component for ``outer.name``; None when the peer trains alone (``none``). A capped peer trains
    and sends only its top arch's slice: ``ladder[0]`` (None: the whole supernet; more levels with
    ``capacity=auto``), whose per-parameter ``slice_masks`` the trainer already measured."""
    if cfg.outer.name == "diloco":
        return DilocoLoop(
            cfg,
            model,
            is_leader=is_leader,
            world_size=world_size,
            distributed=distributed,
            run_dir=run_dir,
            should_stop=should_stop,
            ladder=ladder,
            slice_masks=slice_masks,
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
