"""The sandwich step: in-place distillation really happens, gradients accumulate."""

from __future__ import annotations

import dataclasses
import random

import torch

from dtrain.config import SandwichConfig
from dtrain.supernet import build_supernet
from dtrain.train.losses import hard_loss, kd_loss
from dtrain.train.sandwich import sandwich_backward


def _grads(net):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}


def _setup(cfg, seed=0):
    torch.manual_seed(seed)
    net = build_supernet(cfg)
    net.train()
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    return net, x, y


def test_min_subnet_learns_from_the_detached_teacher(tiny_mbv3_cfg):
    cfg = dataclasses.replace(tiny_mbv3_cfg, dropout=0.0)
    sw = SandwichConfig(distill="kd", temperature=2.0)
    net, x, y = _setup(cfg)
    mx, mn = net.space.max(), net.space.min()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    sandwich_backward(net, [(x, y)], [("max", mx), ("min", mn)], 1.0, sw)
    both = _grads(net)

    # reference: the max alone, then the min with KD from the max's output
    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    net.set_active(mx)
    with net.regularized():
        logits = net(net.adapt_input(x))
    hard_loss(logits, y, sw.label_smoothing).backward()
    teacher = logits.detach()
    net.set_active(mn)
    kd_loss(net(net.adapt_input(x)), teacher, 2.0).backward()
    ref = _grads(net)
    for n in both:
        torch.testing.assert_close(both[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_distillation_off_uses_hard_labels(tiny_mbv3_cfg):
    net, x, y = _setup(dataclasses.replace(tiny_mbv3_cfg, dropout=0.0))
    sw_kd, sw_none = SandwichConfig(distill="kd"), SandwichConfig(distill="none")
    archs = [("max", net.space.max()), ("min", net.space.min())]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    l_kd = sandwich_backward(net, [(x, y)], archs, 1.0, sw_kd)
    g_kd = _grads(net)
    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    l_none = sandwich_backward(net, [(x, y)], archs, 1.0, sw_none)
    assert l_kd["max"] == l_none["max"]
    assert l_kd["min"] != l_none["min"]
    assert any(not torch.equal(g_kd[n], p.grad) for n, p in net.named_parameters() if p.grad is not None)


def test_small_weight_scales_small_subnets_only(tiny_mbv3_cfg):
    net, x, y = _setup(dataclasses.replace(tiny_mbv3_cfg, dropout=0.0))
    sw = SandwichConfig()
    archs = [("max", net.space.max()), ("min", net.space.min())]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    sandwich_backward(net, [(x, y)], archs[:1], 1.0, sw)
    g_max = _grads(net)
    net.zero_grad(set_to_none=True)
    net.load_state_dict(state)
    sandwich_backward(net, [(x, y)], archs, 0.0, sw)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), g_max[n])


def test_micro_batches_accumulate_to_the_mean(tiny_mbv3_cfg):
    """Two micro-batches of 4 give the gradient two ranks of 4 would average."""
    net, x, y = _setup(dataclasses.replace(tiny_mbv3_cfg, dropout=0.0))
    sw = SandwichConfig()
    archs = [("max", net.space.max()), ("min", net.space.min()), ("r", net.space.sample(random.Random(1)))]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    sandwich_backward(net, [(x[:4], y[:4]), (x[4:], y[4:])], archs, 1.0, sw)
    acc = _grads(net)
    parts = []
    for sl in (slice(0, 4), slice(4, 8)):
        net.load_state_dict(state)
        net.zero_grad(set_to_none=True)
        sandwich_backward(net, [(x[sl], y[sl])], archs, 1.0, sw)
        parts.append(_grads(net))
    for n in acc:
        torch.testing.assert_close(acc[n], (parts[0][n] + parts[1][n]) / 2, atol=1e-6, rtol=1e-5)


def test_seeds_fix_dropout_masks(tiny_mbv3_cfg):
    net, x, y = _setup(dataclasses.replace(tiny_mbv3_cfg, dropout=0.5))
    sw = SandwichConfig()
    archs = [("max", net.space.max())]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    runs = []
    for seeds in ([1], [1], [2]):
        net.load_state_dict(state)
        net.zero_grad(set_to_none=True)
        runs.append(sandwich_backward(net, [(x, y)], archs, 1.0, sw, seeds)["max"])
    assert runs[0] == runs[1] != runs[2]


def test_drop_path_teacher_is_a_clean_extra_forward(tiny_mbv3_cfg):
    cfg = dataclasses.replace(tiny_mbv3_cfg, drop_path=0.5, dropout=0.0)
    net, x, y = _setup(cfg)
    assert net.teacher_needs_extra_forward()
    bn = net.stem_bn
    before = int(bn.num_batches_tracked)
    archs = [("max", net.space.max()), ("min", net.space.min())]
    losses = sandwich_backward(net, [(x, y)], archs, 1.0, SandwichConfig())
    # two trained forwards update BN statistics; the teacher's forward does not
    assert int(bn.num_batches_tracked) == before + 2
    assert set(losses) == {"max", "min"}
