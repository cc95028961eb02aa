"""One sandwich step: the largest, the smallest and N random subnets on one batch.

For each micro-batch (x, y):

1. largest subnet, regularised (dropout / drop-path on): loss = CE(logits, y)
   with label smoothing; its clean output (no dropout), detached, is the
   teacher t. When drop-path makes the clean output differ from the trained
   one, the teacher comes from its own no-grad forward with BN statistics
   frozen.
2. every smaller subnet s: loss_s = distill(logits_s, t, y), weighted by the
   schedule's small-subnet weight w.

Each loss is divided by the number of micro-batches and back-propagated at
once, so gradients accumulate over the whole sandwich and peak memory is one
subnet's graph. The caller then syncs gradients once, clips and makes ONE
optimizer step. Returned: the mean loss of every subnet (unweighted).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..supernet.calibrate import frozen_bn_stats
from .losses import distill_loss, hard_loss


def sandwich_backward(
    model,
    micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    archs: List[Tuple[str, dict]],
    small_weight: float,
    cfg,
    seeds: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """Forward and backward of every (name, arch) on every micro-batch. archs[0] is the largest.

    ``seeds[i]`` reseeds torch's RNG (dropout, drop-path) before micro-batch i, so a
    micro-batch gets the same masks whichever rank or accumulation slot runs it."""
    n_micro = len(micro_batches)
    totals = {name: [] for name, _ in archs}  # detached losses; one device sync at the end
    (max_name, max_arch), smalls = archs[0], archs[1:]
    need_teacher = bool(smalls) and cfg.distill != "none"
    for i, (x, y) in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        model.set_active(max_arch)
        xi = model.adapt_input(x)
        teacher = None
        with model.regularized():
            if need_teacher and model.teacher_needs_extra_forward():
                with torch.no_grad(), model.regularized(False), frozen_bn_stats(model):
                    teacher = model(xi).detach()
                logits = model(xi)
            elif need_teacher:
                logits, teacher = model(xi, return_clean=True)
            else:
                logits = model(xi)
        loss = hard_loss(logits, y, cfg.label_smoothing)
        (loss / n_micro).backward()
        totals[max_name].append(loss.detach())
        del logits
        for name, arch in smalls:
            model.set_active(arch)
            out = model(model.adapt_input(x))
            loss = distill_loss(out, teacher, y, cfg)
            (loss * (small_weight / n_micro)).backward()
            totals[name].append(loss.detach())
    model.set_active(max_arch)
    names = list(totals)
    means = torch.stack([torch.stack(totals[n]).mean() for n in names]).tolist()
    return dict(zip(names, means))
