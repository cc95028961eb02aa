"""The mbv3 space and supernet: validation, counting, extraction, cost, elastic layers."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtrain.config import MBV3Config, StageConfig
from dtrain.supernet import ArchError, build_supernet
from dtrain.supernet.elastic_conv import ElasticDepthwiseConv2d, centre_crop
from dtrain.supernet.elastic_norm import ElasticBatchNorm2d
from dtrain.supernet.mbv3_space import MBV3Space


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * k * (m.in_channels // m.groups)

    def linear_hook(m, inp, out):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        module(x[:1])
    for h in hooks:
        h.remove()
    return total


@pytest.fixture
def net(tiny_mbv3_cfg):
    torch.manual_seed(0)
    return build_supernet(tiny_mbv3_cfg)


def test_build_from_dict_and_dataclass(tiny_mbv3_cfg):
    import dataclasses

    d = dataclasses.asdict(tiny_mbv3_cfg)
    a, b = build_supernet(d), build_supernet(tiny_mbv3_cfg)
    assert a.space.size() == b.space.size()
    with pytest.raises(Exception, match="not a known key"):
        build_supernet({**d, "bogus": 1})
    with pytest.raises(Exception, match="model.space"):
        build_supernet({**d, "space": "resnet"})


def test_validate_errors_name_key_and_allowed(net):
    arch = net.space.max()
    net.space.validate(arch)
    bad = dict(arch, resolution=13)
    with pytest.raises(ArchError, match=r"resolution=13 .*8, 12"):
        net.space.validate(bad)
    bad = dict(arch, kernel=[9] + arch["kernel"][1:])
    with pytest.raises(ArchError, match=r"kernel\[0\]=9.*3, 5, 7"):
        net.space.validate(bad)
    with pytest.raises(ArchError, match="depth"):
        net.space.validate(dict(arch, depth=[1]))
    with pytest.raises(ArchError, match="'width' is unknown"):
        net.space.validate(dict(arch, width=1))
    with pytest.raises(ArchError, match="'expand' is missing"):
        net.space.validate({k: v for k, v in arch.items() if k != "expand"})
    with pytest.raises(ArchError, match="must be a dict"):
        net.space.validate([1, 2])


def test_size_matches_enumeration():
    space = MBV3Space(2, [3, 5], [2, 3], [1, 2], [8, 12])
    seen = set()
    for res in space.resolutions:
        for depth in itertools.product(space.depths, repeat=2):
            for kernel in itertools.product(space.kernel_sizes, repeat=space.n_blocks):
                for expand in itertools.product(space.expand_ratios, repeat=space.n_blocks):
                    arch = {"resolution": res, "depth": list(depth), "kernel": list(kernel), "expand": list(expand)}
                    seen.add(space.key(arch))
    assert len(seen) == space.size()


def test_sample_is_seeded_canonical_and_json(net):
    a = [net.space.sample(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    json.loads(json.dumps(a[0]))
    rng = random.Random(1)
    for _ in range(50):
        arch = net.space.sample(rng)
        assert net.space.validate(arch) == arch
    el = net.space.sample(random.Random(3), elastic=["kernel"])
    mx = net.space.max()
    assert el["depth"] == mx["depth"] and el["expand"] == mx["expand"]
    assert net.space.min(elastic=["depth"])["kernel"] == mx["kernel"]
    with pytest.raises(ArchError, match="unknown elastic dimension"):
        net.space.sample(rng, elastic=["width"])


def _archs(net, n=4):
    rng = random.Random(0)
    return [net.space.max(), net.space.min()] + [net.space.sample(rng) for _ in range(n)]


def _warm_bn(net, x):
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(net.adapt_input(x))


def test_extract_matches_supernet_and_scripts(net):
    x = torch.randn(6, 1, 8, 8)
    for arch in _archs(net):
        net.set_active(arch)
        _warm_bn(net, x)
        net.eval()
        xi = net.adapt_input(x)
        y = net(xi)
        static = net.extract(arch).eval()
        assert not any(isinstance(m, (ElasticBatchNorm2d, ElasticDepthwiseConv2d)) for m in static.modules())
        torch.testing.assert_close(static(xi), y, atol=1e-5, rtol=1e-5)
        scripted = torch.jit.script(static)
        torch.testing.assert_close(scripted(xi), y, atol=1e-5, rtol=1e-5)


def test_cost_matches_counting_on_extracted(net):
    for arch in _archs(net, 6):
        static = net.extract(arch)
        cost = net.cost(arch)
        assert cost["params"] == sum(p.numel() for p in static.parameters())
        x = torch.randn(1, 1, arch["resolution"], arch["resolution"])
        assert cost["macs"] == count_macs(static.eval(), x)
    assert net.cost(net.space.max())["macs"] > net.cost(net.space.min())["macs"]


def test_full_ofa_space_counts():
    cfg = MBV3Config(
        num_classes=1000,
        stages=[
            StageConfig(24, 2, "relu", False),
            StageConfig(40, 2, "relu", True),
            StageConfig(80, 2, "hswish", False),
            StageConfig(112, 1, "hswish", True),
            StageConfig(160, 2, "hswish", True),
        ],
        resolutions=[128, 160, 192, 224],
    )
    space = MBV3Space.from_config(cfg)
    assert space.size() == 4 * ((3 * 3) ** 2 + (3 * 3) ** 3 + (3 * 3) ** 4) ** 5
    net = build_supernet(cfg)
    c = net.cost(net.space.max())
    # Once-for-All's largest MobileNetV3 (w1.0): about 7.7M params, a bit over 0.5 GMACs at 224
    assert 7.0e6 < c["params"] < 8.5e6
    assert 4.0e8 < c["macs"] < 7.0e8


def test_gradients_stay_in_active_slice(net):
    arch = net.space.min()
    net.set_active(arch)
    net.train()
    net.zero_grad()
    net(net.adapt_input(torch.randn(4, 1, 8, 8))).sum().backward()
    md = net.layout.max_depth
    block = net.blocks[md]  # first block of stage 1: strided, so not residual (no zero gamma)
    assert not block.residual
    mid = block.expand_conv.active_out
    g = block.expand_conv.weight.grad
    assert g[mid:].abs().sum() == 0 and g[:mid].abs().sum() > 0
    # blocks beyond the active depth get no gradient at all
    assert all(p.grad is None for p in net.blocks[md - 1].parameters())


def test_elastic_bn_slices_running_stats_in_place():
    bn = ElasticBatchNorm2d(8, momentum=1.0)
    x = torch.randn(16, 5, 3, 3) * 3 + 2
    bn.train()
    bn(x)
    torch.testing.assert_close(bn.running_mean[:5], x.mean((0, 2, 3)))
    assert torch.all(bn.running_mean[5:] == 0)
    bn.eval()
    y = bn(x)
    static = bn.to_static(5).eval()
    torch.testing.assert_close(static(x), y)


def test_kernel_transform_starts_as_centre_crop():
    dw = ElasticDepthwiseConv2d(4, [3, 5, 7], kernel_transform=True)
    for k in (3, 5):
        torch.testing.assert_close(dw.kernel(4, k), centre_crop(dw.weight, k))
    with torch.no_grad():
        dw.transforms["5"].mul_(2.0)
    torch.testing.assert_close(dw.kernel(4, 5), 2 * centre_crop(dw.weight, 5))
    torch.testing.assert_close(dw.kernel(4, 3), 2 * centre_crop(dw.weight, 3))
    plain = ElasticDepthwiseConv2d(4, [3, 5, 7], kernel_transform=False)
    assert len(list(plain.parameters())) == 1


def test_residual_blocks_start_with_zero_gamma(net):
    for b in net.blocks:
        if b.residual:
            assert torch.all(b.project_bn.weight == 0)


def test_regularisation_only_inside_context(net):
    x = net.adapt_input(torch.randn(8, 1, 8, 8))
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = net(x), net(x)
    torch.testing.assert_close(a, b)
    with torch.no_grad(), net.regularized():
        c, d = net(x), net(x)
        logits, clean = net(x, return_clean=True)
    assert not torch.allclose(c, d)
    assert not clean.requires_grad


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_random_arch_roundtrip_json(seed):
    cfg = MBV3Config(
        in_channels=1,
        num_classes=10,
        stem_channels=8,
        stem_stride=1,
        stages=[StageConfig(8, 1, "relu", False), StageConfig(16, 2, "hswish", True)],
        final_expand=2,
        feature_dim=32,
        kernel_sizes=[3, 5],
        expand_ratios=[2, 3],
        depths=[1, 2],
        resolutions=[8],
    )
    space = MBV3Space.from_config(cfg)
    arch = space.sample(random.Random(seed))
    assert space.validate(json.loads(json.dumps(arch))) == arch
    assert space.key(arch) == space.key(json.loads(json.dumps(arch)))
