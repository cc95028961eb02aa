"""The inner optimizer's state as flat float32 tensors (the ddp baseline's global state).

For every state key of the optimizer (AdamW: ``step``, ``exp_avg``,
``exp_avg_sq``; SGD: ``momentum_buffer``) one flat tensor over the parameters
in model order; a parameter without state contributes zeros (``step``: one
value per parameter). Loading reverses it exactly.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

KEYS = {"AdamW": ("step", "exp_avg", "exp_avg_sq"), "SGD": ("momentum_buffer",)}


def _keys(optimizer) -> Tuple[str, ...]:
    name = type(optimizer).__name__
    if name not in KEYS:
        raise ValueError(f"optimizer {name} has no flat-state layout (known: {', '.join(KEYS)})")
    return KEYS[name]


def optimizer_flat_state(optimizer, params: Sequence[torch.nn.Parameter]) -> List[Tuple[str, torch.Tensor]]:
    out = []
    for key in _keys(optimizer):
        parts = []
        for p in params:
            st = optimizer.state.get(p, {})
            if key == "step":
                parts.append(torch.tensor([float(st[key]) if key in st else 0.0]))
            elif key in st and st[key] is not None:
                parts.append(st[key].detach().reshape(-1).float().cpu())
            else:
                parts.append(torch.zeros(p.numel()))
        out.append((f"opt.{key}", torch.cat(parts)))
    return out


@torch.no_grad()
def load_optimizer_flat_state(
    optimizer, params: Sequence[torch.nn.Parameter], tensors: Sequence[Tuple[str, torch.Tensor]]
) -> None:
    flat = dict(tensors)
    for key in _keys(optimizer):
        t = flat[f"opt.{key}"]
        off = 0
        for i, p in enumerate(params):
            st = optimizer.state.setdefault(p, {})
            if key == "step":
                st[key] = torch.tensor(float(t[i]), dtype=torch.float32)
            else:
                n = p.numel()
                st[key] = t[off : off + n].view_as(p).to(p.device, p.dtype).clone()
                off += n
