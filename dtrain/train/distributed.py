"""Data parallelism inside one peer (torchrun ranks): setup and gradient sync.

The ranks of a peer run the same sandwich on their shards of the batch and
then make ONE bucketed all-reduce of the accumulated gradients (plus a few
scalars, e.g. the losses for logging) per optimizer step:

    g <- (1/W) * sum_r g_r

Gradients are packed in parameter order into flat buckets of at most
``bucket_mb``; all buckets are launched asynchronously, then awaited. There is
no per-backward hook and no unused-parameter search: a parameter without a
gradient contributes zeros, and since every rank trains the same subnets a
gradient missing on one rank is missing on all of them and stays ``None``.

gloo on CPU, nccl on CUDA; RANK / WORLD_SIZE / LOCAL_RANK come from torchrun.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

log = logging.getLogger("dtrain.train")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref!r} is not allowed: CUDA is not available here, use device=cpu or auto")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device_pref: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the peer's process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world <= 1:
        return DistContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, device, backend)


def shutdown_distributed(barrier: bool = False, timeout_s: float = 60.0) -> None:
    """Leave the process group. With ``barrier`` (a clean finish) every rank first waits for the
    others, so that no rank tears gloo down while a peer rank still talks to it (gloo's threads
    can abort the process when their peer vanishes mid-teardown)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except RuntimeError as e:  # a rank already gone: tear down anyway
            log.warning("final barrier failed: %s", e)
    dist.destroy_process_group()


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src)


def _buckets(params: Sequence[torch.Tensor], bucket_bytes: int) -> List[List[torch.Tensor]]:
    out, cur, size = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if cur and size + nbytes > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    if cur:
        out.append(cur)
    return out


class GradientSync:
    """The one bucketed gradient all-reduce of a sandwich step."""

    def __init__(self, model: nn.Module, bucket_mb: float, ctx: DistContext):
        self.ctx = ctx
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = _buckets(self.params, int(bucket_mb * 2**20))
        self.calls = 0  # all-reduce calls issued (tests count them)

    def sync(self, scalars: Sequence[float] = ()) -> List[float]:
        """Average gradients (and ``scalars``) across ranks; returns the averaged scalars."""
        if not self.ctx.enabled:
            return list(scalars)
        world = self.ctx.world_size
        device = self.params[0].device if self.params else self.ctx.device
        flats, works = [], []
        for i, bucket in enumerate(self.buckets):
            pieces = [
                p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
                for p in bucket
            ]
            if i == len(self.buckets) - 1:
                pieces.append(torch.tensor(list(scalars), dtype=bucket[0].dtype, device=device))
            flat = torch.cat(pieces)
            works.append(dist.all_reduce(flat, async_op=True))
            self.calls += 1
            flats.append(flat)
        for w in works:
            w.wait()
        out: List[float] = []
        for i, (bucket, flat) in enumerate(zip(self.buckets, flats)):
            flat.div_(world)
            off = 0
            for p in bucket:
                n = p.numel()
                if p.grad is not None:
                    p.grad.copy_(flat[off : off + n].view_as(p.grad))
                off += n
            if i == len(self.buckets) - 1:
                out = flat[off:].tolist()
        return out
