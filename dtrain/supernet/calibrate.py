"""BN recalibration: re-estimate the running statistics of the active subnet.

Weight sharing makes the running statistics of batch norm meaningless for any
particular subnet, so before a subnet is evaluated its statistics are reset
and re-estimated as a cumulative average over a fixed, cached calibration set:

    mean_n = mean_{n-1} + (mu_n - mean_{n-1}) / n      (likewise for the variance)

Only the batch-norm layers are put in training mode for this (dropout stays
off), whatever mode the model was in, and every mode is restored afterwards.
Under several ranks each rank runs its share of the calibration batches and
the averages are combined weighted by batch counts, which equals one process
running all of them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .elastic_norm import ElasticBatchNorm2d

BN_TYPES = (ElasticBatchNorm2d, nn.modules.batchnorm._BatchNorm)


def batch_norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


@torch.no_grad()
def calibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    group=None,
    sync: bool = True,
) -> int:
    """Recalibrate ``model``'s BN statistics on ``batches``; returns the batches used here.

    ``prepare`` maps a raw batch to the model input (e.g. the supernet's
    ``adapt_input`` for the active resolution). Under torch.distributed (when
    initialised with world size > 1) statistics are averaged across ranks, unless
    ``sync`` is False (each rank calibrates a different subnet on the whole set).
    """
    bns = batch_norms(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        n = 0
        for x in batches:
            model(prepare(x) if prepare is not None else x)
            n += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        _average_across_ranks(bns, n, group)
    return n


def _average_across_ranks(bns, n: int, group) -> None:
    stats = [t for m in bns for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.reshape(-1) * n for t in stats] + [torch.tensor([float(n)], device=stats[0].device)])
    dist.all_reduce(flat, group=group)
    total = flat[-1].item()
    if total <= 0:
        return
    off = 0
    for t in stats:
        t.copy_(flat[off : off + t.numel()].view_as(t) / total)
        off += t.numel()
    for m in bns:
        m.num_batches_tracked.fill_(int(total))


@contextlib.contextmanager
def preserved_bn_state(model: nn.Module):
    """Restore every BN buffer on exit, so evaluating subnets mid-training leaves
    the training run bit-identical to one that never evaluated."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in batch_norms(model)
    ]
    try:
        yield
    finally:
        for m, rm, rv, nb in saved:
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(nb)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Forward passes inside use batch statistics but leave the running ones untouched."""
    with preserved_bn_state(model):
        yield
