"""Random tensors for throughput benchmarks (classification images or an lm byte stream).

Everything comes from one ``torch.Generator`` seeded with ``cfg.seed``, so two
calls with the same config give the same tensors. Val and test are drawn after
train from the same stream.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import SyntheticConfig
from .base import DataBundle, DataError, TensorSplit, WindowSplit


def load_synthetic(cfg: SyntheticConfig, seq_len: Optional[int] = None) -> DataBundle:
    """Random data shaped by ``cfg``; lm windows are ``seq_len`` long (default ``cfg.shape[0]``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n_eval = max(1, cfg.num_samples // 8)
    if cfg.task == "classification":
        return _classification(cfg, g, n_eval)
    if cfg.task == "lm":
        return _lm(cfg, g, n_eval, seq_len)
    raise DataError(f"data.task={cfg.task!r} is not allowed: choose one of classification, lm")


def _classification(cfg: SyntheticConfig, g: torch.Generator, n_eval: int) -> DataBundle:
    n = cfg.num_samples
    shape = tuple(int(s) for s in cfg.shape)
    total = n + 2 * n_eval
    inputs = torch.randn((total, *shape), generator=g, dtype=torch.float32)
    targets = torch.randint(0, cfg.num_classes, (total,), generator=g, dtype=torch.long)
    cuts = [(0, n), (n, n + n_eval), (n + n_eval, total)]
    train, val, test = (TensorSplit(inputs[a:b], targets[a:b]) for a, b in cuts)
    return DataBundle(
        name="synthetic",
        task="classification",
        train=train,
        val=val,
        test=test,
        num_classes=cfg.num_classes,
        input_shape=shape,
    )


def _lm(cfg: SyntheticConfig, g: torch.Generator, n_eval: int, seq_len: Optional[int]) -> DataBundle:
    if cfg.num_classes > 256:
        raise DataError(
            f"data.num_classes={cfg.num_classes} is not allowed for task lm: "
            "the vocabulary of a byte stream must be <= 256"
        )
    seq_len = int(cfg.shape[0]) if seq_len is None else int(seq_len)
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} is not allowed: must be >= 1")
    n_train = cfg.num_samples * seq_len + seq_len + 1
    n_held = n_eval * seq_len + 1  # n_eval non-overlapping windows
    stream = torch.randint(0, cfg.num_classes, (n_train + 2 * n_held,), generator=g).to(torch.uint8)
    train = WindowSplit(stream[:n_train], seq_len, stride=1)
    val = WindowSplit(stream[n_train : n_train + n_held], seq_len, stride=seq_len)
    test = WindowSplit(stream[n_train + n_held :], seq_len, stride=seq_len)
    return DataBundle(
        name="synthetic",
        task="lm",
        train=train,
        val=val,
        test=test,
        num_classes=cfg.num_classes,
        input_shape=(seq_len,),
        info={"bytes": len(stream)},
    )
