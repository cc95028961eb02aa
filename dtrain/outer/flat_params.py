"""Parameters as one flat float32 vector in a fixed order, split into fragments.

The order is the model's ``named_parameters()`` order, the same on every peer
built from the same config. Streaming DiLoCo syncs F fragments at staggered
times: fragment f is a contiguous run of whole parameters, the runs chosen so
their sizes are as even as a greedy split in order allows.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


class FlatLayout:
    def __init__(self, model: nn.Module, fragments: int = 1):
        self.names: List[str] = []
        self.shapes: List[Tuple[int, ...]] = []
        self.offsets: List[int] = []
        off = 0
        for name, p in model.named_parameters():
            self.names.append(name)
            self.shapes.append(tuple(p.shape))
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self.fragments = self._split(max(1, fragments))

    def _split(self, f: int) -> List[Tuple[int, int]]:
        """(start, end) element ranges of f fragments, cut at parameter boundaries: cut after
        a parameter once the running total passes k/f of the whole, or when every remaining
        parameter is needed to give each remaining fragment one."""
        sizes = [self.offsets[i + 1] - self.offsets[i] for i in range(len(self.offsets) - 1)]
        sizes.append(self.numel - self.offsets[-1]) if self.offsets else None
        f = max(1, min(f, len(sizes)))
        cuts, acc = [], 0
        for i, size in enumerate(sizes[:-1]):
            acc += size
            k = len(cuts) + 1
            if k >= f:
                break
            if acc >= k * self.numel / f or len(sizes) - i - 1 == f - k:
                cuts.append(self.offsets[i + 1])
        bounds = [0] + cuts + [self.numel]
        return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """A new flat float32 CPU copy of the parameters."""
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()])

    def fragment_of(self, model: nn.Module, f: int) -> torch.Tensor:
        """A flat float32 CPU copy of fragment f's parameters."""
        lo, hi = self.fragments[f]
        parts = []
        for p, off in zip(model.parameters(), self.offsets):
            n = p.numel()
            if off + n <= lo or off >= hi:
                continue
            parts.append(p.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(parts)

    @torch.no_grad()
    def load_fragment(self, model: nn.Module, flat: torch.Tensor, f: int) -> None:
        """Copy a fragment's values (flat, fragment-local) into the model's parameters."""
        lo, hi = self.fragments[f]
        for p, off in zip(model.parameters(), self.offsets):
            n = p.numel()
            if off + n <= lo or off >= hi:
                continue
            p.copy_(flat[off - lo : off - lo + n].view_as(p).to(p.device, p.dtype))

    @torch.no_grad()
    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        for p, off in zip(model.parameters(), self.offsets):
            p.copy_(flat[off : off + p.numel()].view_as(p).to(p.device, p.dtype))
