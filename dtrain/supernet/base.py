"""The supernet interface shared by every search space.

A supernet allocates every parameter once, at its largest size, and runs the
active subnet by slicing. The contract used by training, search and export:

- ``space``: the :class:`~dtrain.supernet.space.SearchSpace` of its archs.
- ``set_active(arch)`` validates and activates an arch; ``active_arch`` reads it.
- ``forward(x, return_clean=False)``: logits of the active subnet. With
  ``return_clean=True`` it returns ``(logits, clean)`` where ``clean`` is the
  detached output without dropout (the in-place distillation teacher); only
  allowed when ``teacher_needs_extra_forward()`` is False.
- ``regularized()`` context: dropout / drop-path on (the largest subnet only).
- ``adapt_input(x)``: the batch as the active subnet expects it (resolution).
- ``extract(arch)``: a standalone module of plain torch layers, weights copied.
- ``cost(arch)``: ``{"params": int, "macs": int}`` computed analytically.
- ``task``: ``"classification"`` or ``"lm"``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
from torch import nn

from .space import SearchSpace


class Supernet(nn.Module):
    """Base class: active-arch bookkeeping and the regularisation switch."""

    task: str = "classification"

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self._regularize = False
        self._active: Optional[dict] = None

    # -- arch -----------------------------------------------------------------
    def set_active(self, arch: dict) -> None:
        arch = self.space.validate(arch)
        self._apply_arch(arch)
        self._active = arch

    @property
    def active_arch(self) -> dict:
        if self._active is None:
            self.set_active(self.space.max())
        return copy.deepcopy(self._active)

    def _apply_arch(self, arch: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- regularisation --------------------------------------------------------
    @contextlib.contextmanager
    def regularized(self, on: bool = True):
        """Dropout and drop-path active inside (training mode only)."""
        before = self._regularize
        self._regularize = on
        try:
            yield
        finally:
            self._regularize = before

    @property
    def regularizing(self) -> bool:
        return self._regularize and self.training

    def teacher_needs_extra_forward(self) -> bool:
        """True when regularisation reaches beyond the head, so the clean teacher
        output cannot be read off the regularised forward pass."""
        return False

    # -- io ---------------------------------------------------------------------
    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extract(self, arch: Optional[dict] = None) -> nn.Module:
        """The static network of ``arch`` (default: the active one); the active arch is kept."""
        before = self.active_arch
        if arch is not None:
            self.set_active(arch)
        try:
            return self._extract_active()
        finally:
            self.set_active(before)

    def _extract_active(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self, arch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError
