"""The slice of a top arch: which entries of each supernet parameter the archs inside it use.

A capped peer trains only archs inside its top arch (``SearchSpace.within``);
its pseudo-gradient is zero everywhere else, and only its slice travels.
Subnets are nested (first channels, centre kernels, first blocks, first
heads), so the parameters any arch inside ``top`` touches are those ``top``
touches, plus the smaller-kernel transforms of the elastic depthwise
convolutions (``W_k = crop(W_k') T_k'->k``), which only smaller kernels use.

The slice is measured, the same way for every space: the entries with a
nonzero gradient of a random projection of the output, for ``top`` and for
``top`` with each key capped at each of its choices (every kernel at 3, every
expand at its smallest, ...), on a random input that reaches every input
row (every image channel; for language models every token of the vocabulary
and every position). It runs on a copy of the supernet whose parameters are
all redrawn at random (the slice is a matter of structure, not of values: a
zero-initialised norm scale would otherwise hide everything before it), in
training mode with dropout and drop-path off and every activation the
identity (``activations.linear``), so normalisation keeps the values bounded
and no unit is switched off or saturated: a used entry has a zero gradient
only on a set of inputs of measure zero. Deterministic for a given
model config, top arch and seed, so every peer computes every member's slice
from its top arch alone.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator

import torch

from . import activations
from .base import Supernet


def _capped_variants(model: Supernet, top: dict) -> Iterator[dict]:
    """``top``, then ``top`` with one key's values capped at each of its choices."""
    yield top
    table = model.space.choice_table()
    for key, value in top.items():
        for cap in table[key]:
            if isinstance(value, list):
                capped = [min(v, cap) for v in value]
            else:
                capped = min(value, cap)
            if capped != value:
                yield model.space.validate({**top, key: capped})


def _random_input(model: Supernet, generator: torch.Generator, device) -> torch.Tensor:
    cfg = model.cfg
    if model.space.name == "gpt":
        vocab, block = cfg.vocab_size, cfg.block_size
        rows = -(-vocab // block)
        tokens = torch.randperm(rows * block, generator=generator) % vocab  # every token id at least once
        return tokens.reshape(rows, block).to(device)
    r = max(model.space.choice_table()["resolution"])
    # 16 images: squeeze-excite pools each to one vector, so its units see only 16 samples per input
    return torch.randn(16, cfg.in_channels, r, r, generator=generator).to(device)


def _nonzero_random(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Values that keep every unit alive and no activation saturated: weights with the scale of their
    fan-in (1 / sqrt(fan_in)), and scales / biases (1-D) near 1, never 0."""
    noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    if p.dim() >= 2:
        fan_in = p.numel() // p.shape[0]
        return noise / max(fan_in, 1) ** 0.5
    return 1.0 + 0.2 * noise.clamp(-2.0, 2.0)


def slice_masks(model: Supernet, top: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """For every parameter name, a bool tensor of its shape: True where an arch inside ``top`` uses it.
    ``model`` itself is not touched (the measurement runs on a copy)."""
    probe = copy.deepcopy(model).cpu().double()
    generator = torch.Generator().manual_seed(seed)
    params = dict(probe.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.copy_(_nonzero_random(p, generator))
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    probe.train()
    with probe.regularized(False), activations.linear():
        for arch in _capped_variants(probe, probe.space.validate(top)):
            probe.set_active(arch)
            for _ in range(2):  # two inputs: an entry must have a zero gradient for both to be missed
                probe.zero_grad(set_to_none=True)
                x = _random_input(probe, generator, "cpu")
                out = probe(probe.adapt_input(x if x.dtype == torch.long else x.double()))
                out = out[0] if isinstance(out, tuple) else out
                projection = torch.randn(out.shape, generator=generator, dtype=out.dtype)
                (out * projection).sum().backward()
                for name, p in params.items():
                    if p.grad is not None:
                        masks[name] |= p.grad != 0
    return masks


def slice_fraction(masks: Dict[str, torch.Tensor]) -> float:
    """The share of the supernet's parameter entries inside the slice."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)
