"""Shrinking schedules and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import ConfigError, SandwichConfig
from dtrain.train.lr_schedule import WarmupCosine
from dtrain.train.shrink import ShrinkSchedule

DIMS = ("resolution", "kernel", "depth", "expand")
ORDER = ("kernel", "depth", "expand")


def test_uniform_trains_everything_from_the_start():
    s = ShrinkSchedule(SandwichConfig(schedule="uniform"), DIMS, ORDER, 100)
    p = s.at(0)
    assert p.small and p.weight == 1.0 and p.elastic is None


def test_delayed_trains_full_net_then_ramps():
    s = ShrinkSchedule(SandwichConfig(schedule="delayed", delay_fraction=0.5, ramp_fraction=0.1), DIMS, ORDER, 100)
    assert not s.at(49).small
    assert s.at(50).small and s.at(50).weight == pytest.approx(0.1)
    assert s.at(54).weight == pytest.approx(0.5)
    assert s.at(59).weight == 1.0 and s.at(99).weight == 1.0
    weights = [s.at(t).weight for t in range(100)]
    assert weights == sorted(weights)


def test_progressive_follows_the_order():
    cfg = SandwichConfig(schedule="progressive", progressive_fractions=[0.25, 0.25, 0.25, 0.25])
    s = ShrinkSchedule(cfg, DIMS, ORDER, 100)
    assert not s.at(0).small and not s.at(24).small
    assert set(s.at(25).elastic) == {"resolution", "kernel"}
    assert set(s.at(50).elastic) == {"resolution", "kernel", "depth"}
    assert set(s.at(99).elastic) == set(DIMS)


def test_progressive_fractions_must_match_order():
    cfg = SandwichConfig(schedule="progressive", progressive_fractions=[0.5, 0.5])
    with pytest.raises(ConfigError, match="progressive_fractions"):
        ShrinkSchedule(cfg, DIMS, ORDER, 100)


def test_warmup_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = WarmupCosine(opt, 1.0, warmup=10, total=110, min_ratio=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    lrs = []
    for _ in range(110):
        lrs.append(s.lr)
        s.step()
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    state = s.state_dict()
    s2 = WarmupCosine(opt, 1.0, 10, 110, 0.1)
    s2.load_state_dict(state)
    assert s2.lr == s.lr and opt.param_groups[0]["lr"] == s.lr
