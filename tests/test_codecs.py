"""Codecs (fp32/fp16/bf16/int8/int4) and error feedback: bounds, validation, sizes, determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dtrain.outer.codecs import CODEC_NAMES, get_codec
from dtrain.outer.error_feedback import ErrorFeedback
from dtrain.wire.codec import CodecError

QMAX = {"int8": 127, "int4": 7}
BLOCK_CODECS = ("int8", "int4")
FP16_MAX = 65000.0
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bound_ok(name: str, x: torch.Tensor, y: torch.Tensor, block: int) -> None:
    """Assert the documented round-trip bound of codec ``name``."""
    assert y.dtype == torch.float32 and y.shape == x.shape
    xd, yd = x.double().numpy(), y.double().numpy()
    err = np.abs(xd - yd)
    if name == "fp32":
        assert np.array_equal(x.view(torch.int32).numpy(), y.view(torch.int32).numpy())
    elif name == "fp16":
        assert np.all(err <= np.maximum(2.0**-11 * np.abs(xd), 2.0**-25))
    elif name == "bf16":
        assert np.all(err <= np.maximum(2.0**-8 * np.abs(xd), 2.0**-134))
    else:
        qmax = QMAX[name]
        for start in range(0, xd.size, block):
            a = np.abs(xd[start : start + block]).max()
            e = err[start : start + block]
            if a == 0:
                assert np.all(yd[start : start + block] == 0)
                continue
            s = max(a / qmax, 2.0**-126)
            assert e.max() <= s / 2 * (1 + 2.0**-16), (start, a, e.max(), s / 2)
            assert np.abs(yd[start : start + block]).max() <= max(a, 2.0**-126 * qmax) * (1 + 2.0**-20)


def _roundtrip(name: str, x: torch.Tensor, block: int = 128) -> None:
    c = get_codec(name, block_size=block)
    payload = c.encode(x)
    assert isinstance(payload, bytes) and len(payload) == c.encoded_size(x.numel())
    y = c.decode(payload, x.numel())
    _bound_ok(name, x, y, block)
    # deterministic, and the codec grid is a fixed point (re-encoding loses nothing)
    assert c.encode(x.clone()) == payload
    assert c.encode(y) == payload
    assert torch.equal(c.decode(payload, x.numel()), y)


# -- round-trip bounds -----------------------------------------------------------------

SIZES = st.sampled_from([0, 1, 2, 6, 7, 8, 127, 128, 129, 255, 256, 257, 300]) | st.integers(0, 700)


@pytest.mark.parametrize("name", CODEC_NAMES)
@HYP
@given(data=st.data())
def test_roundtrip_bound_arbitrary_floats(name, data):
    """Hypothesis-chosen float32 elements (zeros, subnormals, 1e-30 .. 1e30)."""
    block = data.draw(st.sampled_from([128, 7, 1]) if name in BLOCK_CODECS else st.just(128))
    n = data.draw(SIZES)
    hi = float(np.float32(FP16_MAX if name == "fp16" else 1e30))
    arr = data.draw(hnp.arrays(np.float32, n, elements=st.floats(-hi, hi, width=32)))
    _roundtrip(name, torch.from_numpy(arr.copy()), block)


@pytest.mark.parametrize("name", CODEC_NAMES)
@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n=SIZES | st.sampled_from([20_000, 65_537]),
    center=st.floats(-30, 30),
    spread=st.floats(0, 10),
    zero_frac=st.sampled_from([0.0, 0.1]),
)
def test_roundtrip_bound_wide_magnitudes(name, seed, n, center, spread, zero_frac):
    """Log-uniform magnitudes within [1e-30, 1e30] (fp16: its finite range), random signs."""
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(center - spread, center + spread, n)
    mag = np.clip(mag, 1e-30, FP16_MAX if name == "fp16" else 1e30)
    x = mag * rng.choice([-1.0, 1.0], n) * (rng.random(n) >= zero_frac)
    _roundtrip(name, torch.from_numpy(x.astype(np.float32)))


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_zero_blocks_decode_to_exact_zeros(name):
    c = get_codec(name, 16)
    x = torch.zeros(16 * 5 + 3)
    x[16:32] = torch.linspace(-1, 1, 16)
    x[40] = -0.0
    y = c.decode(c.encode(x), x.numel())
    assert torch.equal(y[:16], torch.zeros(16)) and torch.equal(y[32:], torch.zeros(y.numel() - 32))
    assert c.decode(c.encode(torch.zeros(1000)), 1000).abs().max() == 0


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_block_codecs_take_any_finite_value(name):
    big = float(np.finfo(np.float32).max)
    for x in (torch.tensor([big, -big, 1.0]), torch.tensor([1e-45, -1e-40, 0.0]), torch.tensor([1e-38] * 3)):
        _roundtrip(name, x)


def test_largest_value_lands_on_qmax():
    """The scale is rounded down, so the block's largest |x| maps to ±qmax, never clamped."""
    for name, qmax in QMAX.items():
        c = get_codec(name, 4)
        x = torch.tensor([0.3, -1.7, 0.9, 1.1, 3e-7, 2e-7, -1e-7, 0.0])
        y = c.decode(c.encode(x), 8)
        s = y[1].abs() / qmax
        assert float(s) <= 1.7 / qmax and float(s) > 1.7 / qmax * (1 - 2**-8)


# -- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encoded_size_exact(name):
    for block in (1, 2, 3, 64, 128, 1000):
        c = get_codec(name, block)
        for n in (0, 1, 2, 3, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4097):
            nb = -(-n // block)
            expected = {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n + 2 * nb, "int4": (n + 1) // 2 + 2 * nb}[
                name
            ]
            assert c.encoded_size(n) == expected
            assert len(c.encode(torch.randn(n))) == expected


def test_payload_overhead_at_block_128():
    n = 1 << 20
    int4, int8 = get_codec("int4", 128), get_codec("int8", 128)
    assert (int4.encoded_size(n) - n / 2) / (n / 2) < 0.04
    assert (int8.encoded_size(n) - n) / n < 0.02
    assert int4.encoded_size(n + 1) - (n + 2) / 2 < 0.04 * n / 2


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_wrong_length_payload(name):
    c = get_codec(name, 32)
    p = c.encode(torch.randn(301))
    for bad in (p[:-1], p + b"\0", b"", p + p):
        with pytest.raises(CodecError, match=rf"^{name} payload: expected {len(p)} bytes .* got {len(bad)}$"):
            c.decode(bad, 301)
    with pytest.raises(CodecError, match="expected 0 bytes"):
        c.decode(b"\0", 0)
    assert c.decode(b"", 0).shape == (0,)
    assert c.decode(bytearray(p), 301).shape == (301,)  # any bytes-like


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_bad_scale(name):
    c = get_codec(name, 8)
    p = bytearray(c.encode(torch.randn(20)))
    for u16, what in ((0xFF00, "inf"), (0xFF80, "NaN"), (0xFFFF, "NaN"), (0xFE00, "overflow")):
        q = bytearray(p)
        q[2:4] = u16.to_bytes(2, "little")  # block 1's scale
        with pytest.raises(CodecError, match=rf"^{name} payload: expected .*block 1.*") as ei:
            c.decode(bytes(q), 20)
        assert what in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_every_scale_pattern_is_rejected_or_finite(name):
    """The scale format has no sign bit: a pattern decodes to finite values of the codes'
    sign, or is rejected (a negative scale cannot be expressed)."""
    c = get_codec(name)
    x = torch.tensor([1.0, -0.5, 0.25])
    p = bytearray(c.encode(x))
    for u16 in list(range(0, 1 << 16, 61)) + [0xFEFF, 0xFF00, 0xFF01, 0xFF7F, 0xFF80, 0xFFFF]:
        p[0:2] = u16.to_bytes(2, "little")
        try:
            y = c.decode(bytes(p), 3)
        except CodecError:
            scale = np.array([u16 << 15], dtype=np.uint32).view(np.float32)
            with np.errstate(over="ignore"):
                assert u16 >= 0xFF00 or not np.isfinite(scale * np.float32(QMAX[name]))[0]
            continue
        assert bool(torch.isfinite(y).all()) and y[0] >= 0 and y[1] <= 0 and y[2] >= 0


def test_bad_codes():
    c8 = get_codec("int8", 4)
    p = bytearray(c8.encode(torch.randn(6)))
    p[2 * 2 + 3] = 0x80  # code -128
    with pytest.raises(CodecError, match=r"^int8 payload: expected codes in \[-127, 127\], got -128 at index 3$"):
        c8.decode(bytes(p), 6)
    c4 = get_codec("int4", 4)
    p = bytearray(c4.encode(torch.randn(7)))
    p[4] &= 0xF0  # value 0 -> nibble 0
    with pytest.raises(CodecError, match=r"^int4 payload: expected nibbles in 1\.\.15, got 0 at index 0$"):
        c4.decode(bytes(p), 7)
    p = bytearray(c4.encode(torch.randn(7)))
    p[-1] |= 0x30  # padding nibble after the 7th value
    with pytest.raises(CodecError, match="padding nibble"):
        c4.decode(bytes(p), 7)


@pytest.mark.parametrize(
    "name, patterns",
    [
        ("fp32", (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff")),
        ("fp16", (b"\x00\x7c", b"\x00\xfc", b"\x00\x7e")),
        ("bf16", (b"\x80\x7f", b"\x80\xff", b"\xc0\x7f")),
    ],
)
def test_float_payload_non_finite(name, patterns):
    c = get_codec(name)
    p = c.encode(torch.ones(5))
    w = len(patterns[0])
    for bad in patterns:
        q = p[: 2 * w] + bad + p[3 * w :]
        with pytest.raises(CodecError, match=rf"^{name} payload: expected finite values, got .* at index 2$"):
            c.decode(q, 5)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_non_finite_input_rejected(name):
    c = get_codec(name, 16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in (0, 150, 299):
            x = torch.randn(300)
            x[i] = bad
            with pytest.raises(CodecError, match=rf"^{name}\.encode: input must be finite, got .* at index {i}$"):
                c.encode(x)


def test_float_overflow_input_rejected():
    with pytest.raises(CodecError, match="overflows fp16"):
        get_codec("fp16").encode(torch.tensor([1.0, 7e4]))
    get_codec("fp16").encode(torch.tensor([65519.0]))  # rounds to 65504
    with pytest.raises(CodecError, match="overflows bf16"):
        get_codec("bf16").encode(torch.tensor([3.4e38]))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_input_type(name):
    c = get_codec(name)
    for bad in (torch.zeros(2, 2), torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float16)):
        with pytest.raises(ValueError, match="1-D float32 CPU tensor"):
            c.encode(bad)
    with pytest.raises(ValueError, match="numel"):
        c.decode(b"", -1)


def test_get_codec_errors():
    with pytest.raises(ValueError, match=r"^unknown codec 'int3': expected one of fp32, fp16, bf16, int8, int4$"):
        get_codec("int3")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            get_codec("int8", bad)
    assert [get_codec(n).name for n in CODEC_NAMES] == list(CODEC_NAMES)
    assert get_codec("fp32").lossless and not any(get_codec(n).lossless for n in CODEC_NAMES[1:])
    assert get_codec("int4", 64).block_size == 64


# -- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_deterministic_across_threads_and_layout(name):
    c = get_codec(name)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2 * 300_001, generator=g) * torch.rand(2 * 300_001, generator=g) ** 4
    x = base[::2]  # non-contiguous
    assert not x.is_contiguous()
    ref = c.encode(x.contiguous())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = c.encode(x)
        y1 = c.decode(ref, x.numel())
    finally:
        torch.set_num_threads(threads)
    assert one == ref == c.encode(x)
    y2 = c.decode(ref, x.numel())
    assert torch.equal(y1, y2)
    y2 += 1  # a new, writable tensor each time
    assert torch.equal(c.decode(ref, x.numel()), y1)
    assert torch.equal(x, base[::2])  # input untouched


# -- error feedback ----------------------------------------------------------------------


@pytest.mark.parametrize("name, small", [("int8", 1e-3), ("int4", 0.03)])
def test_error_feedback_recovers_sub_step_signal(name, small):
    """A constant input below half a quantisation step is lost without feedback; with it the
    running sum of transmitted values tracks the running sum of inputs, error bounded."""
    block, qmax = 128, QMAX[name]
    c = get_codec(name, block)
    x = torch.full((4 * block,), small)
    x[::block] = 1.0  # one large value per block sets the step s = 1 / qmax
    assert small < 0.5 / qmax
    small_idx = torch.ones_like(x, dtype=torch.bool)
    small_idx[::block] = False

    ef = ErrorFeedback()
    total = torch.zeros_like(x, dtype=torch.float64)
    sent_ef = torch.zeros_like(total)
    sent_plain = torch.zeros_like(total)
    bound = 0.5 * 1.0 / qmax * 1.01
    errors = []
    for _ in range(300):
        total += x
        sent_ef += ef.quantize_with_feedback("g", x, c)
        sent_plain += c.decode(c.encode(x), x.numel())
        err = (total - sent_ef).abs().max().item()
        assert err <= bound
        errors.append(err)
    assert torch.all(sent_plain[small_idx] == 0)  # lost entirely
    assert (total - sent_plain)[small_idx].min() > 300 * small * 0.99
    assert max(errors[-100:]) <= bound and sent_ef[small_idx].min() > 300 * small - bound
    # the residual is exactly what has not been transmitted yet
    assert torch.allclose(ef.residual("g").double(), total - sent_ef, atol=1e-5)


def test_error_feedback_two_step_and_lossless():
    c = get_codec("int4", 8)
    ef = ErrorFeedback()
    x = torch.randn(20)
    v = ef.compensate("a", x)
    assert torch.equal(v, x) and v is not x
    x_hat = c.decode(c.encode(v), 20)
    ef.update("a", v, x_hat)
    assert torch.equal(ef.residual("a"), v - x_hat)
    v2 = ef.compensate("a", x)
    assert torch.equal(v2, x + (v - x_hat))
    # a lossless codec sends x + e exactly and clears the residual
    out = ef.quantize_with_feedback("a", x, get_codec("fp32"))
    assert torch.equal(out, v2) and ef.residual("a") is None
    with pytest.raises(ValueError, match="residual has 20 values but the input has 21"):
        ef.update("a", v, x_hat)
        ef.compensate("a", torch.zeros(21))
    ef.reset("a")
    assert "a" not in ef
    ef.quantize_with_feedback("b", x, c)
    ef.reset()
    assert list(ef.names()) == []


def test_error_feedback_state_dict_round_trip():
    c = get_codec("int8", 16)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(100, generator=g) * 1e-2 for _ in range(8)]
    ef = ErrorFeedback()
    for x in xs[:4]:
        ef.quantize_with_feedback("f0", x, c)
        ef.quantize_with_feedback("f1", x[:50], c)
    sd = ef.state_dict()
    assert set(sd) == {"f0", "f1"} and all(isinstance(v, torch.Tensor) for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    ef2 = ErrorFeedback()
    ef2.load_state_dict(torch.load(buf, weights_only=True))
    sd["f0"].add_(1.0)  # a copy: the live residual is unaffected
    for x in xs[4:]:
        assert torch.equal(ef.quantize_with_feedback("f0", x, c), ef2.quantize_with_feedback("f0", x, c))
        assert torch.equal(ef.quantize_with_feedback("f1", x[:50], c), ef2.quantize_with_feedback("f1", x[:50], c))
    for k in ("f0", "f1"):
        assert torch.equal(ef.state_dict()[k], ef2.state_dict()[k])
    with pytest.raises(ValueError, match="non-finite"):
        ef2.load_state_dict({"f0": torch.tensor([float("nan")])})
    with pytest.raises(ValueError, match="1-D float32"):
        ef2.load_state_dict({"f0": torch.zeros(2, 2)})


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_view_gives_the_same_bytes_as_encode(name):
    codec = get_codec(name, block_size=32)
    x = torch.linspace(-3, 3, 1000)
    assert bytes(memoryview(codec.encode_view(x)).cast("B")) == codec.encode(x)


def test_fp32_encode_view_is_the_tensor_memory_and_decode_keeps_a_handed_over_buffer():
    codec = get_codec("fp32")
    x = torch.linspace(-1, 1, 100)
    view = codec.encode_view(x)
    x[3] = 42.0  # the view is x's memory (no copy), valid only while x is unchanged
    assert np.frombuffer(view, dtype="<f4")[3] == 42.0
    buf = bytearray(codec.encode(x))
    out = codec.decode(buf, 100)  # a writable buffer handed over: decoded in place
    buf[0:4] = np.float32(7.0).tobytes()
    assert float(out[0]) == 7.0
    frozen = bytes(codec.encode(x))
    out2 = codec.decode(frozen, 100)  # bytes: a new tensor (writable)
    out2[0] = 1.0
    assert codec.decode(frozen, 100)[0] == x[0]
