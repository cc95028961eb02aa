"""Weighted outer averaging (``dtrain.outer.weighting``) and weighted error feedback
(``dtrain.outer.error_feedback``): integer weights, the fixed-order weighted mean against independent
references (float64, and the float32 arithmetic written out in numpy), the old unweighted bits for equal
weights, and the weighted residual's bound over many rounds with changing weights."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dtrain.comm.collective import Group
from dtrain.outer.codecs import get_codec
from dtrain.outer.error_feedback import ErrorFeedback
from dtrain.outer.weighting import WEIGHTINGS, finish_mean, integer_weights, weighted_mean, weighted_sum_into

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0**-24  # unit roundoff of float32
F32_MAX = float(np.finfo(np.float32).max)
TINY = 2.0**-149  # the smallest float32 subnormal: the absolute error of one rounding near zero is at most half of it


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def old_unweighted_mean(parts) -> torch.Tensor:
    """The mean before weights existed: float32 zeros, ``add_`` each part in order, then ``/ k``."""
    total = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        total.add_(p)
    return total.div_(len(parts))


def numpy_weighted_mean(parts, weights) -> np.ndarray:
    """The documented float32 arithmetic, written out in numpy (no torch, nothing fused): from zeros, in
    order, ``total = total + fl(w * part)`` (skipping w = 0), then one division by the total weight."""
    total = np.zeros(parts[0].shape, dtype=np.float32)
    for p, w in zip(parts, weights):
        if w:
            total = total + p.numpy() * np.float32(w)
    return total / np.float32(sum(weights))


# ---------------------------------------------------------------- integer_weights


def test_integer_weights_examples():
    assert integer_weights([400, 200, 600]) == (2, 1, 3)
    assert integer_weights([12, 18]) == (2, 3)
    assert integer_weights([3, 5]) == (3, 5)
    assert integer_weights([640, 640, 640]) == (1, 1, 1)  # equal samples: the unweighted mean
    assert integer_weights([0, 300, 300]) == (0, 1, 1)  # a member that sat out weighs 0
    assert integer_weights([7]) == (1,)
    assert integer_weights([0, 0]) == (0, 0)  # nobody trained: all zero (the caller averages nothing)
    assert integer_weights([]) == ()
    assert integer_weights([400, 0, 5], "uniform") == (1, 0, 1)
    assert integer_weights([0, 0], "uniform") == (0, 0)
    assert integer_weights([400, 200, 600], "samples") == integer_weights([2, 1, 3])


def test_integer_weights_refusals():
    with pytest.raises(ValueError, match="must be >= 0"):
        integer_weights([10, -1])
    with pytest.raises(ValueError, match="must be >= 0"):
        integer_weights([-5], "uniform")
    for bad in ("mean", "Samples", ""):
        with pytest.raises(ValueError, match="samples or uniform"):
            integer_weights([1, 2], bad)
    assert WEIGHTINGS == ("samples", "uniform")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**7) | st.sampled_from([0, 1, 128, 3200]), max_size=10))
def test_integer_weights_keep_the_ratios_in_lowest_terms(samples):
    w = integer_weights(samples)
    assert len(w) == len(samples) and all(isinstance(x, int) and x >= 0 for x in w)
    assert [x == 0 for x in w] == [s == 0 for s in samples]  # zero exactly where nothing was trained
    for i in range(len(w)):  # the same ratios: w_i * s_j == w_j * s_i
        for j in range(len(w)):
            assert w[i] * samples[j] == w[j] * samples[i]
    if any(samples):
        assert reduce(math.gcd, w, 0) == 1  # the smallest such integers
        g = reduce(math.gcd, samples, 0)
        assert list(w) == [s // g for s in samples]
        if len(set(s for s in samples if s)) == 1:  # equal among those that trained: 1s (and 0s)
            assert set(w) <= {0, 1}
    u = integer_weights(samples, "uniform")
    assert u == tuple(1 if s else 0 for s in samples)


def test_group_weights():
    members = (("a", "x:1"), ("b", "x:2"), ("c", "x:3"))
    plain = Group(1, 0, members, "b")
    assert [plain.weight(r) for r in range(3)] == [1, 1, 1] and plain.total_weight == 3
    weighted = Group(1, 0, members, "b", weights=(2, 0, 5))
    assert [weighted.weight(r) for r in range(3)] == [2, 0, 5] and weighted.total_weight == 7
    with pytest.raises(ValueError, match="nothing to average"):
        _ = Group(1, 0, members, "b", weights=(0, 0, 0)).total_weight


# ---------------------------------------------------------------- the weighted sum: the same bits on every CPU


@settings(max_examples=200, deadline=None)
@given(
    total=hnp.arrays(np.float32, 97, elements=st.floats(-1e6, 1e6, width=32)),
    part=hnp.arrays(np.float32, 97, elements=st.floats(-1e6, 1e6, width=32)),
    weight=st.integers(0, 5000),
)
def test_weighted_sum_into_rounds_the_product_then_the_sum(total, part, weight):
    """``total += w * part`` is two float32 roundings, never a fused multiply-add: torch's ``add_(alpha=w)``
    is an FMA in its AVX2/AVX512 kernels and not in its default ones, so its bits depend on the machine,
    and the members of a gloo group each compute this sum themselves."""
    t = torch.from_numpy(total.copy())
    weighted_sum_into(t, torch.from_numpy(part), weight)
    want = total + part * np.float32(weight) if weight else total
    assert t.numpy().tobytes() == want.tobytes()


def _cpu_parts():
    """Inputs made by numpy (torch's own randn takes other paths with other bits on other CPUs)."""
    rng = np.random.default_rng(5)
    return [torch.from_numpy((rng.standard_normal(10_007) * 10.0 ** (i - 2)).astype(np.float32)) for i in range(5)]


_CHILD = r"""
import hashlib, torch
from test_weighting import _cpu_parts
from dtrain.outer.weighting import weighted_mean
out = weighted_mean(_cpu_parts(), (3, 7, 0, 12345, 1))
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def test_weighted_mean_bits_do_not_depend_on_the_cpu_capability():
    """The same inputs through torch's scalar kernels (``ATEN_CPU_CAPABILITY=default``) and the vectorised
    ones of this machine: the same bits (the weighted gloo mean is summed on every member)."""
    here = hashlib.sha256(bits(weighted_mean(_cpu_parts(), (3, 7, 0, 12345, 1)))).hexdigest()
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([tests, os.path.dirname(tests)])
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    capability, sha = out.stdout.split()
    assert capability == "DEFAULT"
    assert sha == here, f"scalar kernels give other bits than {torch.backends.cpu.get_cpu_capability()}"


# ---------------------------------------------------------------- weighted_mean against references

_SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9)
# finite float32 values from subnormals to 1e30 (weights <= 1000, k <= 6: no overflow)
_BIG = float(np.float32(1e30))
_VALUES = st.floats(-_BIG, _BIG, width=32) | st.sampled_from(
    [0.0, -0.0, float(np.float32(1e-45)), float(np.float32(-3e-40)), 1.0, -2.5]
)


@st.composite
def _weighted_parts(draw, equal: bool = False):
    shape = draw(_SHAPES)
    k = draw(st.integers(1, 6))
    parts = [torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=_VALUES))) for _ in range(k)]
    if equal:
        return parts, None
    weights = draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda w: sum(w) > 0))
    return parts, tuple(weights)


@HYP
@given(_weighted_parts())
def test_weighted_mean_is_the_fixed_order_float32_arithmetic(case):
    parts, weights = case
    got = weighted_mean(parts, weights)
    assert got.dtype == torch.float32 and got.shape == parts[0].shape
    assert bits(got) == numpy_weighted_mean(parts, weights).tobytes()
    assert bits(weighted_mean(parts, list(weights))) == bits(got)  # any sequence of weights


@HYP
@given(_weighted_parts())
def test_weighted_mean_is_within_float32_rounding_of_the_float64_mean(case):
    """Reference in float64 (exact products: 24-bit values times <= 10-bit weights), computed apart from the
    module. Bound: k products and k-1 additions (a dot product: gamma_k * sum |w x|) and the division."""
    parts, weights = case
    k, total_w = len(parts), sum(weights)
    xs = np.stack([p.numpy().astype(np.float64) for p in parts])
    w = np.array(weights, dtype=np.float64).reshape((k,) + (1,) * (xs.ndim - 1))
    want = (w * xs).sum(0) / total_w
    scale = (w * np.abs(xs)).sum(0) / total_w
    bound = (k + 1) * U / (1 - (k + 1) * U) * scale + (k + 2) * TINY
    got = weighted_mean(parts, weights).numpy().astype(np.float64)
    assert np.all(np.abs(got - want) <= bound)


@HYP
@given(_weighted_parts(equal=True), st.integers(1, 10**6), st.sampled_from(WEIGHTINGS))
def test_equal_weights_give_the_old_unweighted_bits(case, samples, weighting):
    parts, _ = case
    old = bits(old_unweighted_mean(parts))
    assert bits(weighted_mean(parts)) == old
    assert bits(weighted_mean(parts, integer_weights([samples] * len(parts), weighting))) == old
    # uniform weighting: everyone who trained counts once, however much
    uneven = [samples * (i + 1) for i in range(len(parts))]
    assert bits(weighted_mean(parts, integer_weights(uneven, "uniform"))) == old


@HYP
@given(_weighted_parts(), st.sampled_from([F32_MAX, -F32_MAX, 3e38, 1e30]))
def test_a_zero_weight_contributes_nothing(case, huge):
    """A member with weight 0 (it sat out) changes no bit, whatever finite values it holds, wherever it is."""
    parts, weights = case
    want = bits(weighted_mean(parts, weights))
    big = torch.full_like(parts[0], huge)
    for at in (0, len(parts) // 2, len(parts)):
        with_zero = parts[:at] + [big] + parts[at:]
        got = weighted_mean(with_zero, weights[:at] + (0,) + weights[at:])
        assert bits(got) == want
        assert bool(torch.isfinite(got).all())


def test_a_zero_weight_member_is_as_if_absent_from_the_unweighted_mean():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1000, generator=g) for _ in range(3))
    huge = torch.full((1000,), F32_MAX)
    weights = integer_weights([640, 0, 640, 0])
    assert weights == (1, 0, 1, 0)
    assert bits(weighted_mean([a, huge, b, -huge], weights)) == bits(old_unweighted_mean([a, b]))
    alone = integer_weights([0, 0, 640])
    assert bits(weighted_mean([a, b, c], alone)) == bits(c)  # one member alone: its own values


def test_nothing_to_average_is_refused():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_mean([x, x], (0, 0))
    with pytest.raises(ValueError, match="nothing to average"):
        finish_mean(x.clone(), ())


# ---------------------------------------------------------------- weighted error feedback

QMAX = {"int8": 127, "int4": 7}
BLOCK = 32


def _block_step(v: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per value: its block's quantisation step absmax / qmax (float64), at least the smallest normal's."""
    n = v.numel()
    pad = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=torch.float64)
    pad[:n] = v.abs()
    s = (pad.view(-1, BLOCK).max(1).values / qmax).clamp_min(2.0**-126)
    return s.repeat_interleave(BLOCK)[:n]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_weighted_feedback_tracks_the_weighted_sum_within_one_round(name):
    """sum_t w_t x̂_t = sum_t w_t x_t - e_T (module docstring): over 250 rounds with a weight drawn per
    round (0: the member sits out, error feedback untouched), the weighted sum sent stays within one
    round's quantisation error w_t * s_t / 2 of the weighted sum of the inputs, up to float32 rounding;
    without feedback, a small steady component below half a step is lost and the gap grows."""
    qmax, codec = QMAX[name], get_codec(name, BLOCK)
    n, rounds = 7 * BLOCK + 5, 250
    g = torch.Generator().manual_seed(len(name))
    bias = torch.full((n,), 0.2 / qmax)  # under half a step of the blocks' scale (~1 / qmax): lost alone
    ef = ErrorFeedback()
    true_sum = torch.zeros(n, dtype=torch.float64)
    sent_sum = torch.zeros(n, dtype=torch.float64)
    plain_sum = torch.zeros(n, dtype=torch.float64)
    slop = torch.zeros(n, dtype=torch.float64)  # float32 rounding accumulated by the rule, per value
    weights = torch.randint(0, 65, (rounds,), generator=g).tolist()
    weights[-1] = max(weights[-1], 1)
    worst_ratio = 0.0
    for w in weights:
        x = bias + 0.3 * torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.05)
        x[::BLOCK] = 1.0  # one large value per block: the step is about 1 / qmax
        if w == 0:  # sits out: nothing sent, e kept
            continue
        e = ef.residual("f0")
        e_prev = torch.zeros(n, dtype=torch.float64) if e is None else e.double()
        x_hat = ef.quantize_with_feedback("f0", x, codec, float(w))
        e_new = ef.residual("f0")
        assert e_new is not None
        e_new = e_new.double()
        v = x.double() + e_prev / w  # what was quantised (to float32 rounding)
        true_sum += w * x.double()
        sent_sum += w * x_hat.double()
        plain_sum += w * codec.decode(codec.encode(x), n).double()
        slop += 4 * U * (w * v.abs() + e_prev.abs() + e_new.abs())
        gap = true_sum - sent_sum
        # the identity: the gap is exactly the residual, up to float32 rounding
        assert torch.all((gap - e_new).abs() <= slop)
        # and the residual is one round's quantisation error, in weighted units
        step = _block_step(v, qmax)
        one_round = w * step / 2 * (1 + 2.0**-16)
        assert torch.all(gap.abs() <= one_round + slop)
        worst_ratio = max(worst_ratio, float((gap.abs() / (w * step)).max()))
    assert worst_ratio > 0.25  # the bound is not vacuous
    small = torch.ones(n, dtype=torch.bool)
    small[::BLOCK] = False
    lost = (true_sum - plain_sum)[small]  # without feedback the bias never gets through
    assert float(lost.min()) > 20 * float(one_round.max())


def _unweighted_rule(x: torch.Tensor, e, codec):
    """The rule of the module docstring's first part, written out: v = x + e, x̂ = Q(v), e = v - x̂."""
    v = x.clone() if e is None else x + e
    x_hat = codec.decode(codec.encode(v), v.numel())
    return x_hat, v - x_hat


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_weight_one_is_the_unweighted_rule_bit_for_bit(name):
    codec = get_codec(name, BLOCK)
    g = torch.Generator().manual_seed(3)
    ef_default, ef_one, ef_pow2 = ErrorFeedback(), ErrorFeedback(), ErrorFeedback()
    e = None
    for _ in range(50):
        x = torch.randn(5 * BLOCK + 3, generator=g) * torch.exp(torch.randn(5 * BLOCK + 3, generator=g))
        want, e = _unweighted_rule(x, e, codec)
        assert bits(ef_default.quantize_with_feedback("f", x, codec)) == bits(want)
        assert bits(ef_one.quantize_with_feedback("f", x, codec, 1.0)) == bits(want)
        # a constant power-of-two weight: e = w * d and e / w are exact, so the same bits again
        assert bits(ef_pow2.quantize_with_feedback("f", x, codec, 8.0)) == bits(want)
        for ef, scale in ((ef_default, 1.0), (ef_one, 1.0), (ef_pow2, 8.0)):
            r = ef.residual("f")
            assert r is not None and bits(r) == bits(e * scale)


def test_weighted_feedback_two_step_form_and_refusals():
    codec = get_codec("int4", 8)
    ef = ErrorFeedback()
    x = torch.randn(20)
    v = ef.compensate("a", x, 3.0)  # no residual yet: x itself, whatever the weight
    assert torch.equal(v, x)
    x_hat = codec.decode(codec.encode(v), 20)
    ef.update("a", v, x_hat, 3.0)
    r = ef.residual("a")
    assert r is not None and torch.equal(r, (v - x_hat) * 3.0)
    assert torch.equal(ef.compensate("a", x, 5.0), x + r / 5.0)  # divided by the next round's own weight
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="must be > 0"):
            ef.compensate("a", x, bad)
    # a lossless codec: x + e / w is sent as it is, nothing is left over
    out = ef.quantize_with_feedback("a", x, get_codec("fp32"), 4.0)
    assert torch.equal(out, x + r / 4.0) and ef.residual("a") is None
