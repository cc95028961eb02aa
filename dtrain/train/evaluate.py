"""Evaluation of one subnet: BN recalibration, then loss and accuracy (or bits
per byte for language models) over a whole split in a fixed order.

Under several ranks each rank evaluates every W-th batch and the sums are
all-reduced, so every rank returns the same numbers. The supernet's BN buffers
are restored afterwards, so evaluating never changes training.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..supernet.calibrate import calibrate_bn, preserved_bn_state


@torch.no_grad()
def evaluate_split(
    model, split, batch_size: int, device, task: str, rank: int = 0, world: int = 1, prepare=None
) -> dict:
    """Sum of loss and correct predictions of the model as it is (no calibration)."""
    model.eval()
    n = len(split)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for b, start in enumerate(range(0, n, batch_size)):
        if b % world != rank:
            continue
        idx = torch.arange(start, min(n, start + batch_size))
        x, y = split.batch(idx)
        x, y = x.to(device), y.to(device)
        logits = model(prepare(x) if prepare is not None else x)
        flat, tgt = logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)
        loss_sum += F.cross_entropy(flat, tgt, reduction="sum").double().cpu()
        correct += (flat.argmax(-1) == tgt).sum().double().cpu()
        count += tgt.numel()
    if world > 1:
        t = torch.stack([loss_sum, correct, count]).to(device)
        dist.all_reduce(t)
        loss_sum, correct, count = t.cpu().unbind()
    count = max(count.item(), 1.0)
    loss = loss_sum.item() / count
    out = {"loss": loss, "acc": correct.item() / count, "count": int(count)}
    if task == "lm":
        out["bpb"] = loss / math.log(2)
    return out


def evaluate_arch(
    model,
    arch: dict,
    split,
    calib: List[torch.Tensor],
    batch_size: int,
    device,
    task: str,
    rank: int = 0,
    world: int = 1,
    keep_bn: bool = True,
) -> dict:
    """Activate ``arch``, recalibrate BN on this rank's calibration batches, evaluate ``split``.

    ``keep_bn=True`` restores the supernet's BN buffers afterwards. With ``world=1`` the
    calibration is this process's alone (no averaging with other ranks)."""
    was_training = model.training
    before = model.active_arch
    ctx = preserved_bn_state(model) if keep_bn else _null()
    with ctx:
        model.set_active(arch)
        calibrate_bn(model, [c.to(device) for c in calib], prepare=model.adapt_input, sync=world > 1)
        out = evaluate_split(model, split, batch_size, device, task, rank, world, prepare=model.adapt_input)
    model.set_active(before)
    model.train(was_training)
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def calibration_batches(
    split,
    n_batches: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    generator_seed: Optional[int] = None,
) -> List[torch.Tensor]:
    """The fixed calibration set: ``n_batches`` batches of train inputs from a seeded
    permutation; rank r keeps batches r, r+W, r+2W, ..."""
    g = torch.Generator().manual_seed(seed if generator_seed is None else generator_seed)
    perm = torch.randperm(len(split), generator=g)
    out = []
    for b in range(n_batches):
        idx = perm[(b * batch_size) % len(split) :][:batch_size]
        if len(idx) < batch_size:  # wrap around small splits
            idx = torch.cat([idx, perm[: batch_size - len(idx)]])
        if b % world == rank:
            out.append(split.batch(idx)[0])
    return out
