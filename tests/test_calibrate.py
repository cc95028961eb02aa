"""BN recalibration: cumulative average, works from eval mode, restores modes."""

from __future__ import annotations

import torch
from torch import nn

from dtrain.supernet import build_supernet
from dtrain.supernet.calibrate import batch_norms, calibrate_bn, preserved_bn_state
from dtrain.supernet.elastic_norm import ElasticBatchNorm2d


def test_cumulative_average_of_batch_statistics():
    bn = ElasticBatchNorm2d(6, momentum=0.1)
    model = nn.Sequential(bn)
    batches = [torch.randn(10, 4, 3, 3) * (i + 1) + i for i in range(5)]
    model.eval()
    calibrate_bn(model, batches)
    means = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    vars_ = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean[:4], means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var[:4], vars_, atol=1e-4, rtol=1e-4)
    assert bn.momentum == 0.1 and not bn.training  # restored


def test_calibration_changes_stats_even_from_eval_mode(tiny_mbv3_cfg):
    net = build_supernet(tiny_mbv3_cfg)
    net.eval()
    net.set_active(net.space.min())
    before = [m.running_mean.clone() for m in batch_norms(net)]
    calib = [torch.randn(8, 1, 8, 8) + 1.0 for _ in range(3)]
    n = calibrate_bn(net, calib, prepare=net.adapt_input)
    assert n == 3
    after = [m.running_mean for m in batch_norms(net)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not net.training and all(not m.training for m in net.modules())


def test_calibrated_eval_is_independent_of_training_history(tiny_mbv3_cfg):
    torch.manual_seed(0)
    net = build_supernet(tiny_mbv3_cfg)
    arch = net.space.min()
    calib = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    x = torch.randn(4, 1, 8, 8)

    def calibrated_out():
        net.set_active(arch)
        calibrate_bn(net, calib, prepare=net.adapt_input)
        net.eval()
        return net(net.adapt_input(x))

    a = calibrated_out()
    net.train()
    net.set_active(net.space.max())
    with torch.no_grad():
        net(net.adapt_input(torch.randn(8, 1, 8, 8) * 5))  # pollute running stats
    torch.testing.assert_close(calibrated_out(), a)


def test_preserved_bn_state_restores_buffers(tiny_mbv3_cfg):
    net = build_supernet(tiny_mbv3_cfg)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with preserved_bn_state(net):
        calibrate_bn(net, [torch.randn(8, 1, 8, 8)], prepare=net.adapt_input)
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
