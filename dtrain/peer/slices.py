"""Every member's slice of the flat parameter vector, from the top arch it announced at join.

A capped peer trains only archs inside its top arch; the coordinates its
pseudo-gradient covers are that arch's slice (``dtrain.supernet.coverage``),
laid out in the outer loop's flat order (``FlatLayout``: the model's
``named_parameters()`` order). The spec a member announces is its top arch as
canonical JSON ("" for the whole supernet), so every member computes every
other member's mask itself, the same bits from the same model config; masks
are cached per spec.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

import torch

from ..supernet.base import Supernet
from ..supernet.coverage import slice_masks


def slice_spec(space, top: Optional[dict]) -> str:
    """What a peer announces: its top arch as canonical JSON, or "" for the whole supernet."""
    return "" if top is None else space.key(top)


class SliceBook:
    def __init__(self, model: Supernet):
        self.model = model
        self._masks: Dict[str, Optional[torch.Tensor]] = {"": None}

    def add(self, spec: str, masks: Dict[str, torch.Tensor]) -> None:
        """A spec whose per-parameter masks are already known (this peer's own, from the trainer)."""
        self._masks[spec] = self._flatten(masks)

    def _flatten(self, masks: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([masks[name].reshape(-1) for name, _ in self.model.named_parameters()])

    def flat_mask(self, spec: str) -> Optional[torch.Tensor]:
        """The bool mask over the flat parameter vector of a member announcing ``spec`` (None: all)."""
        if spec not in self._masks:
            arch = self.model.space.validate(json.loads(spec))
            self._masks[spec] = self._flatten(slice_masks(self.model, arch))
        return self._masks[spec]
