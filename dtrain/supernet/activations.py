"""The supernets' nonlinearities, with a switch that makes them all the identity.

``slice_masks`` (``coverage``) measures which parameter entries an arch uses
by their gradients; a ReLU that is off for every probe sample, or a
saturated hard sigmoid, would hide entries the arch does use. Inside
``linear()`` every activation here is the identity, so a gradient is zero
only where a parameter entry takes no part in the computation. Training and
inference never enter ``linear()``.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

_state = threading.local()


def _linear() -> bool:
    return getattr(_state, "linear", False)


@contextlib.contextmanager
def linear():
    """Every activation of this module is the identity inside (this thread only)."""
    before = _linear()
    _state.linear = True
    try:
        yield
    finally:
        _state.linear = before


def relu(x: torch.Tensor) -> torch.Tensor:
    return x if _linear() else F.relu(x)


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return x if _linear() else F.hardswish(x)


def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return x if _linear() else F.hardsigmoid(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x if _linear() else F.gelu(x)
