"""The units a latency table times, per search space.

An arch's latency is predicted as the sum of the latencies of the units it
runs (a lookup table, as in Once-for-All). A unit is a static module of
plain torch layers with a fixed input shape:

- mbv3: ``stem@R`` (stem conv + fixed first block), ``block{s}.{i}:k{K}e{E}@R``
  for block i of stage s at kernel K, expand E and resolution R, ``head@R``
  (final conv, pooling, feature mix, classifier);
- gpt: ``embed@E`` (token + position embedding of a full context),
  ``layer:h{H}r{R}@E`` (one transformer layer; every layer has the same shape),
  ``head@E`` (final layer norm and LM head).

``units(model, arch)`` names the units an arch runs; ``modules(model, batch)``
yields every unit of the space once as (name, module, example input).
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def units(model, arch: dict) -> List[str]:
    arch = model.space.validate(arch)
    if model.space.name == "mbv3":
        r = arch["resolution"]
        return (
            [f"stem@{r}"]
            + [f"block{s}.{i}:k{k}e{e}@{r}" for s, i, k, e in model.space.active_blocks(arch)]
            + [f"head@{r}"]
        )
    e = arch["embed"]
    return [f"embed@{e}"] + [f"layer:h{h}r{m}@{e}" for _, h, m in model.space.active_layers(arch)] + [f"head@{e}"]


def example_input(model, arch: dict, batch_size: int, device) -> torch.Tensor:
    """An input batch for the whole extracted subnet of ``arch`` (what its stem unit takes)."""
    if model.space.name == "mbv3":
        r = model.space.validate(arch)["resolution"]
        return torch.zeros(batch_size, model.cfg.in_channels, r, r, device=device).contiguous(
            memory_format=torch.channels_last
        )
    return torch.zeros(batch_size, model.cfg.block_size, dtype=torch.long, device=device)


def modules(model, batch_size: int) -> Iterator[Tuple[str, nn.Module, torch.Tensor]]:
    before = model.active_arch
    try:
        if model.space.name == "mbv3":
            yield from _mbv3(model, batch_size)
        else:
            yield from _gpt(model, batch_size)
    finally:
        model.set_active(before)


class _MBV3Head(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.final, self.feature_mix, self.classifier = net.final, net.feature_mix, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.hardswish(self.feature_mix(self.final(x).mean((2, 3)))))


def _mbv3(model, batch: int):
    space = model.space
    dev = next(model.parameters()).device
    for r in space.resolutions:
        arch = dict(space.max(), resolution=r)
        net = model.extract(arch).eval()
        shapes = []
        hooks = [
            b.register_forward_pre_hook(lambda m, a, shapes=shapes: shapes.append(tuple(a[0].shape)))
            for b in net.blocks
        ]
        x = torch.zeros(batch, model.cfg.in_channels, r, r, device=dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            last = net.blocks(net.first(net.stem(x)))
        for h in hooks:
            h.remove()
        yield f"stem@{r}", nn.Sequential(net.stem, net.first), x
        md = space.max_depth
        for j, block in enumerate(model.blocks):
            s, i = divmod(j, md)
            inp = torch.zeros(shapes[j], device=dev).contiguous(memory_format=torch.channels_last)
            for k in space.kernel_sizes:
                for e in space.expand_ratios:
                    block.set_arch(k, e)
                    yield f"block{s}.{i}:k{k}e{e}@{r}", block.to_static().eval(), inp
        yield f"head@{r}", _MBV3Head(net).eval(), last


class _GPTEmbed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.tok_emb, self.pos_emb = net.tok_emb, net.pos_emb

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))


class _GPTHead(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.ln_f, self.lm_head = net.ln_f, net.lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))


def _gpt(model, batch: int):
    space, T = model.space, model.cfg.block_size
    dev = next(model.parameters()).device
    for e in space.embed_dims:
        net = model.extract(dict(space.max(), embed=e)).eval()
        idx = torch.zeros(batch, T, dtype=torch.long, device=dev)
        h = torch.zeros(batch, T, e, device=dev)
        yield f"embed@{e}", _GPTEmbed(net), idx
        block = model.blocks[0]
        for heads in space.heads:
            for m in space.mlp_ratios:
                block.set_arch(e, heads, m)
                yield f"layer:h{heads}r{m}@{e}", block.to_static().eval(), h
        yield f"head@{e}", _GPTHead(net), h
