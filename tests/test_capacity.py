"""A peer's capacity: the top arch (deterministic, within the budgets, maximal under the rule) and its slice
of the supernet (every arch inside the top arch uses only the slice), for both spaces."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import CapacityConfig, ConfigError, model_config_from
from dtrain.supernet import build_supernet
from dtrain.supernet.budget import Budget
from dtrain.supernet.capacity import one_larger, top_arch
from dtrain.supernet.coverage import slice_fraction, slice_masks

MBV3 = dict(
    space="mbv3",
    in_channels=1,
    num_classes=10,
    stem_channels=8,
    stages=[
        {"channels": 8, "stride": 1, "act": "relu", "se": False},
        {"channels": 16, "stride": 2, "act": "hswish", "se": True},
    ],
    final_expand=2,
    feature_dim=32,
    depths=[1, 2],
    kernel_sizes=[3, 5],
    expand_ratios=[2, 3],
    resolutions=[8, 12],
)
GPT = dict(
    space="gpt",
    block_size=16,
    vocab_size=64,
    depths=[1, 2],
    embed_dims=[16, 32],
    head_dim=8,
    heads=[1, 2],
    mlp_ratios=[2, 4],
)
SPACES = {"mbv3": MBV3, "gpt": GPT}
_MODELS: dict = {}


def model(space: str):
    if space not in _MODELS:
        torch.manual_seed(0)
        cfg = model_config_from(SPACES[space])
        _MODELS[space] = (build_supernet(cfg), cfg)
    return _MODELS[space]


def budget(space: str, **limits) -> Budget:
    net, cfg = model(space)
    return Budget(net, cfg, CapacityConfig(**limits), key="capacity")


@pytest.mark.parametrize("space", SPACES)
@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0.0, 1.2), by=st.sampled_from(["max_macs", "max_params"]))
def test_top_arch_fits_is_maximal_and_deterministic(space, frac, by):
    net, _ = model(space)
    key = by[4:]
    lo, hi = net.cost(net.space.min())[key], net.cost(net.space.max())[key]
    b = budget(space, **{by: int(lo + frac * (hi - lo))})
    top = top_arch(net.space, b)
    assert top == top_arch(net.space, budget(space, **{by: int(lo + frac * (hi - lo))}))
    assert b.fits(top) and net.space.validate(top) == top
    assert not any(b.fits(grown) for grown in one_larger(net.space, top))  # no single value can grow
    if frac >= 1.0:
        assert top == net.space.max()


@pytest.mark.parametrize("space", SPACES)
def test_a_capacity_below_the_smallest_subnet_names_the_minimum(space):
    net, _ = model(space)
    smallest = net.cost(net.space.min())["params"]
    with pytest.raises(ConfigError, match=f"capacity.max_params=1 is not allowed: .*params={smallest:g}"):
        top_arch(net.space, budget(space, max_params=1))


@pytest.mark.parametrize("space", SPACES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_archs_sampled_within_the_top_are_inside_it(space, seed):
    net, _ = model(space)
    rng = random.Random(seed)
    top = net.space.sample(rng)
    for _ in range(5):
        sub = net.space.sample_within(top, rng)
        assert net.space.within(sub, top) and net.space.validate(sub) == sub
    assert net.space.within(net.space.min(), top) and net.space.within(top, net.space.max())


@pytest.mark.parametrize("space", SPACES)
def test_every_arch_inside_the_top_uses_only_its_slice(space):
    """The union of the parameters of random archs inside a capped top arch (measured with other seeds)
    lies inside the top arch's slice; the slice is deterministic, smaller than the supernet, and the model
    is left untouched."""
    net, _ = model(space)
    lo, hi = net.cost(net.space.min())["params"], net.cost(net.space.max())["params"]
    top = top_arch(net.space, budget(space, max_params=int(lo + 0.4 * (hi - lo))))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    masks = slice_masks(net, top)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    again = slice_masks(net, top)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    rng = random.Random(1)
    for i in range(4):
        sub = net.space.sample_within(top, rng)
        used = slice_masks(net, sub, seed=10 + i)
        outside = {k: int((used[k] & ~masks[k]).sum()) for k in masks}
        assert sum(outside.values()) == 0, {k: v for k, v in outside.items() if v}
    full = slice_masks(net, net.space.max())
    assert slice_fraction(masks) < slice_fraction(full)
    assert all(bool((masks[k] & ~full[k]).sum() == 0) for k in masks)
