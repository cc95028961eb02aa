"""Checkpoints: written atomically (see ``dtrain.atomic_io``) and loaded with
``weights_only=True``, so no arbitrary objects are unpickled."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .atomic_io import atomic_write


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)
