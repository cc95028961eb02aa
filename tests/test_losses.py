"""Distillation losses: KD and alpha-divergence values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import SandwichConfig
from dtrain.train.losses import alpha_divergence_loss, distill_loss, hard_loss, kd_loss

logits = st.integers(0, 10_000).map(lambda s: torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) * 3)


@settings(max_examples=30, deadline=None)
@given(logits, logits, st.floats(0.5, 4.0))
def test_kd_is_scaled_kl(s, t, temp):
    p = F.softmax(t / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp), kl, atol=1e-5, rtol=1e-4)
    assert kd_loss(t, t, temp).abs() < 1e-5


def _alpha_ref(p, q, a):
    if abs(a - 1) < 1e-9:
        return (p * (p / q).log()).sum(-1)
    if abs(a) < 1e-9:
        return (q * (q / p).log()).sum(-1)
    return (q * ((p / q) ** a - 1)).sum(-1) / (a * (a - 1))


@settings(max_examples=30, deadline=None)
@given(logits, logits, st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]), st.sampled_from([-1.0, 0.5, 1.0]))
def test_alpha_divergence_value_is_max_of_two(s, t, a1, a2):
    lo, hi = min(a1, a2), max(a1, a2)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    ref = torch.maximum(_alpha_ref(p, q, lo), _alpha_ref(p, q, hi)).mean()
    got = alpha_divergence_loss(s, t, lo, hi, iw_clip=1e9)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert got >= -1e-6


def test_alpha_gradient_matches_autograd_without_clipping():
    torch.manual_seed(0)
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7)
    alpha = 0.5
    alpha_divergence_loss(s, t, alpha, alpha, iw_clip=1e9).backward()
    s2 = s.detach().clone().requires_grad_()
    p, q = F.softmax(t, -1), F.softmax(s2, -1)
    _alpha_ref(p, q, alpha).mean().backward()
    torch.testing.assert_close(s.grad, s2.grad, atol=1e-5, rtol=1e-4)


def test_alpha_importance_weight_clipping_bounds_gradient():
    s = torch.tensor([[10.0, -10.0, 0.0]], requires_grad=True)  # student sure of class 0
    t = torch.tensor([[-10.0, 10.0, 0.0]])  # teacher sure of class 1
    alpha_divergence_loss(s, t, 1.0, 1.0, iw_clip=5.0).backward()
    clipped = s.grad.abs().max().item()
    s.grad = None
    alpha_divergence_loss(s, t, 1.0, 1.0, iw_clip=1e12).backward()
    assert clipped < s.grad.abs().max().item()
    assert math.isfinite(clipped)


def test_distill_loss_modes():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    cfg = SandwichConfig(distill="kd", hard_label_weight=0.0)
    torch.testing.assert_close(distill_loss(s, t, y, cfg), kd_loss(s, t))
    cfg = SandwichConfig(distill="kd", hard_label_weight=0.25, label_smoothing=0.0)
    torch.testing.assert_close(distill_loss(s, t, y, cfg), 0.75 * kd_loss(s, t) + 0.25 * hard_loss(s, y))
    cfg = SandwichConfig(distill="none", label_smoothing=0.1)
    torch.testing.assert_close(distill_loss(s, t, y, cfg), hard_loss(s, y, 0.1))


def test_lm_shapes_are_flattened():
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    y = torch.randint(0, 11, (2, 3))
    assert hard_loss(s, y).shape == ()
    torch.testing.assert_close(kd_loss(s, t), kd_loss(s.reshape(6, 11), t.reshape(6, 11)))


@pytest.mark.parametrize("distill", ["kd", "alpha"])
def test_teacher_gets_no_gradient(distill):
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    cfg = SandwichConfig(distill=distill)
    distill_loss(s, t, torch.zeros(3, dtype=torch.long), cfg).backward()
    assert t.grad is None and s.grad is not None
