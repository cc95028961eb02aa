"""Data interface: in-memory splits that hand out batches by index.

Every loader returns a :class:`DataBundle` with ``train``, ``val`` and ``test``
splits. A split is indexable by a LongTensor of item indices; the sampler in
``dtrain.train.sampler`` decides the order, so the data itself holds no RNG and
the run is reproducible bit for bit.

- classification: items are images, ``batch(idx) -> (x float [B,C,H,W], y long [B])``
- lm: items are windows of ``seq_len`` bytes; ``batch(idx) -> (x long [B,T], y long [B,T])``
  with y the next byte. The train split has a window at every offset; val and
  test use non-overlapping windows, so evaluation predicts every byte once
  (up to the last ``seq_len - 1`` bytes of the split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import torch

from ..errors import DataError  # noqa: F401  (re-exported: raised here)


class Split:
    """Base class of a split."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class TensorSplit(Split):
    """Images and labels held as tensors."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets):
            raise DataError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: torch.Tensor):
        return self.inputs[idx], self.targets[idx]


class WindowSplit(Split):
    """Next-byte prediction windows over a 1-D uint8 tensor of bytes."""

    def __init__(self, data: torch.Tensor, seq_len: int, stride: int):
        if data.dim() != 1:
            raise DataError("a text split must be 1-D")
        if stride < 1 or seq_len < 1:
            raise DataError(f"window seq_len={seq_len} and stride={stride} must both be >= 1")
        if len(data) < seq_len + 1:
            raise DataError(
                f"a text split of {len(data)} bytes is shorter than one window of seq_len+1={seq_len + 1} bytes"
            )
        self.data, self.seq_len, self.stride = data, seq_len, stride
        self._n = (len(data) - seq_len - 1) // stride + 1
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self._n

    def batch(self, idx: torch.Tensor):
        starts = idx.to(torch.long) * self.stride
        w = self.data[starts[:, None] + self._offsets[None, :]].long()
        return w[:, :-1], w[:, 1:]


@dataclass
class DataBundle:
    name: str
    task: str  # classification | lm
    train: Split
    val: Split
    test: Split
    num_classes: int  # lm: vocabulary size
    input_shape: Tuple[int, ...] = ()  # classification: (C, H, W); lm: (seq_len,)
    info: dict = field(default_factory=dict)  # e.g. {"unigram_bpb": float} for lm

    def describe(self) -> str:
        return (
            f"{self.name}: {self.task}, train={len(self.train)} val={len(self.val)} "
            f"test={len(self.test)}, classes={self.num_classes}, input={tuple(self.input_shape)}"
        )


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int):
    """Fixed random train/val/test index split of n items (same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return train.sort().values, val.sort().values, test.sort().values


def standardise(train: torch.Tensor, *others: torch.Tensor):
    """Per-channel standardisation with statistics of the train images [N,C,H,W]."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]
