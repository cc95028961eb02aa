"""Deterministic batch order shared by every rank of a peer.

Epoch e visits the train items in the order ``randperm(n, seed=h(seed, e))``;
a step takes the next ``batch_size`` indices, crossing into the next epoch
when one runs out. Every rank computes the same global batch and keeps its
own contiguous shard, so a peer of W ranks sees exactly the batch one process
would. The state (epoch, position) is two integers, saved in checkpoints.
"""

from __future__ import annotations

import torch

from .seeds import derive_seed


class BatchSampler:
    def __init__(self, n: int, batch_size: int, seed: int, purpose: str = "train"):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty split")
        self.size, self.batch_size, self.seed, self.purpose = n, batch_size, seed, purpose
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.purpose, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            perm = self._perm_for(self.epoch)
            take = perm[self.pos : self.pos + need]
            parts.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch (sizes divide evenly)."""
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]
