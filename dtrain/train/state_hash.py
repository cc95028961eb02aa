"""Hashes of model state in a fixed order: equal hashes mean bit-identical tensors."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensor_hash(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the given order."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def param_hash(model: nn.Module) -> str:
    """Hash of the parameters (not buffers: BN statistics are per rank until recalibrated)."""
    return tensor_hash(model.named_parameters())
