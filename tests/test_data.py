"""Tests of the data loaders in dtrain.data: digits, text, CIFAR-10 binary, synthetic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import CIFAR10Config, DigitsConfig, SyntheticConfig, TextConfig
from dtrain.data import build_data
from dtrain.data.base import DataError, TensorSplit, WindowSplit, split_indices
from dtrain.data.cifar10 import load_cifar10, read_cifar10_binary, write_cifar10_binary
from dtrain.data.digits import load_digits
from dtrain.data.synthetic import load_synthetic
from dtrain.data.text import (
    DEFAULT_TEXT_FILES,
    default_text_paths,
    load_text,
    unigram_bits_per_byte,
)


def _all(split):
    return split.batch(torch.arange(len(split)))


# --------------------------------------------------------------------------- base


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), val=st.floats(0, 0.45), test=st.floats(0, 0.45), seed=st.integers(0, 2**31))
def test_split_indices_partition(n, val, test, seed):
    train_i, val_i, test_i = split_indices(n, val, test, seed)
    assert len(val_i) == round(n * val) and len(test_i) == round(n * test)
    joined = torch.cat([train_i, val_i, test_i]).sort().values
    assert torch.equal(joined, torch.arange(n))  # disjoint and covering
    for part in (train_i, val_i, test_i):
        assert torch.equal(part, part.sort().values)
    again = split_indices(n, val, test, seed)
    assert all(torch.equal(a, b) for a, b in zip((train_i, val_i, test_i), again))


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 20), extra=st.integers(0, 60), stride=st.integers(1, 25))
def test_window_split_arithmetic(seq_len, extra, stride):
    data = torch.arange(seq_len + 1 + extra).to(torch.uint8)
    split = WindowSplit(data, seq_len, stride)
    n = len(split)
    assert (n - 1) * stride + seq_len + 1 <= len(data) < n * stride + seq_len + 1  # last window fits, no more
    x, y = _all(split)
    assert x.shape == y.shape == (n, seq_len) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[:, 0], torch.arange(n) * stride)


def test_window_split_too_short():
    with pytest.raises(DataError, match="seq_len"):
        WindowSplit(torch.zeros(4, dtype=torch.uint8), 4, 1)


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_digits(DigitsConfig())


def test_digits_splits(digits):
    assert digits.task == "classification" and digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == round(1797 * 0.2) and len(digits.val) == round(1797 * 0.1)
    x, y = _all(digits.train)
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.long
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3
    assert set(y.tolist()) == set(range(10))


def test_digits_disjoint_and_deterministic(digits):
    other = load_digits(DigitsConfig())
    for name in ("train", "val", "test"):
        a, b = getattr(digits, name), getattr(other, name)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    # the 1797 images are all distinct and every split goes through the same affine map,
    # so the splits are disjoint exactly when the standardised rows are all distinct
    rows = torch.cat([s.inputs.flatten(1) for s in (digits.train, digits.val, digits.test)])
    assert len(torch.unique(rows, dim=0)) == 1797
    assert load_digits(DigitsConfig(split_seed=1)).val.targets.tolist() != digits.val.targets.tolist()


# --------------------------------------------------------------------------- text


def test_default_text_files_exist():
    paths = default_text_paths()
    assert len(paths) == len(DEFAULT_TEXT_FILES)
    for p in paths:
        assert os.path.isfile(p), p
    assert os.path.getsize(paths[-1]) > 500_000  # pydoc_data/topics.py, last: val/test are prose


@pytest.fixture(scope="module")
def text():
    return load_text(TextConfig(), 64)


def test_text_default_corpus(text):
    seq = 64
    assert text.task == "lm" and text.num_classes == 256 and text.input_shape == (seq,)
    assert text.info["bytes"] > 900_000 and text.info["files"] == default_text_paths()
    assert 3 < text.info["unigram_bpb"] < 8
    total = len(text.train.data) + len(text.val.data) + len(text.test.data)
    assert total == text.info["bytes"]
    assert text.train.data.dtype == torch.uint8
    idx = torch.tensor([0, 5, len(text.train) - 1])
    x, y = text.train.batch(idx)
    assert x.shape == y.shape == (3, seq) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], text.train.data[idx + seq].long())
    assert len(text.train) == len(text.train.data) - seq


def test_text_val_windows_cover_once(text):
    seq = 64
    for split in (text.val, text.test):
        x, y = _all(split)
        n = len(split)
        data = split.data.long()
        assert torch.equal(x.flatten(), data[: n * seq])  # non-overlapping, contiguous, from byte 0
        assert torch.equal(y.flatten(), data[1 : n * seq + 1])
        assert len(data) - 1 - n * seq < seq  # fewer than one window of targets left over


def test_text_custom_paths(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(bytes(range(200)) * 3)
    b.write_bytes(b"hello world " * 50)
    cfg = TextConfig(paths=[str(a), str(b)], val_fraction=0.1, test_fraction=0.1)
    bundle = load_text(cfg, 8)
    stream = a.read_bytes() + b"\n" + b.read_bytes()
    assert bundle.info["bytes"] == len(stream) and bundle.info["files"] == [str(a), str(b)]
    got = torch.cat([bundle.train.data, bundle.val.data, bundle.test.data])
    assert bytes(got.tolist()) == stream
    n = len(stream)
    assert len(bundle.val.data) == round(n * 0.1) and len(bundle.test.data) == round(n * 0.1)
    # max_bytes truncates before splitting
    short = load_text(TextConfig(paths=[str(a)], max_bytes=300, val_fraction=0.1, test_fraction=0.1), 8)
    assert short.info["bytes"] == 300 and bytes(short.train.data[:10].tolist()) == bytes(range(10))


def test_text_too_small_for_fractions(tmp_path):
    f = tmp_path / "small.txt"
    f.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="val_fraction"):
        load_text(TextConfig(paths=[str(f)]), 16)


def test_text_missing_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError) as e:
        load_text(TextConfig(paths=[missing]), 8)
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_unigram_bpb():
    uniform = np.arange(256, dtype=np.uint8).repeat(4)
    assert unigram_bits_per_byte(uniform, uniform) == pytest.approx(8.0)
    skewed = np.zeros(10_000, dtype=np.uint8)
    assert unigram_bits_per_byte(skewed, skewed[:100]) < 0.1


# --------------------------------------------------------------------------- cifar10


def _fake_cifar(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture()
def cifar_dir(tmp_path):
    images, labels = _fake_cifar(50, 0)
    images[0, :, 3, 7] = (11, 22, 33)  # R, G, B at row 3, column 7 of record 0
    write_cifar10_binary(str(tmp_path / "data_batch_1.bin"), images, labels)
    write_cifar10_binary(str(tmp_path / "test_batch.bin"), *_fake_cifar(20, 1))
    return tmp_path, images, labels


def test_cifar_binary_layout(cifar_dir):
    root, images, labels = cifar_dir
    raw = (root / "data_batch_1.bin").read_bytes()
    assert len(raw) == 50 * 3073 and raw[0] == labels[0]
    pix = 1 + 3 * 32 + 7  # offset inside the record of row 3, column 7
    assert (raw[pix], raw[pix + 1024], raw[pix + 2048]) == (11, 22, 33)
    got_images, got_labels = read_cifar10_binary(str(root / "data_batch_1.bin"))
    assert got_images.dtype == np.uint8 and got_images.shape == (50, 3, 32, 32)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert tuple(got_images[0, :, 3, 7]) == (11, 22, 33)


def test_cifar_load(cifar_dir):
    root, images, labels = cifar_dir
    bundle = load_cifar10(CIFAR10Config(root=str(root), val_fraction=0.2))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 20)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    tr, va, _ = split_indices(50, 0.2, 0.0, 0)
    assert torch.equal(bundle.train.targets, torch.from_numpy(labels)[tr])
    assert torch.equal(bundle.val.targets, torch.from_numpy(labels)[va])
    # standardisation is the affine map of the train statistics, per channel
    raw_train = torch.from_numpy(images)[tr].float() / 255
    mean, std = raw_train.mean(dim=(0, 2, 3)), raw_train.std(dim=(0, 2, 3))
    expect = (raw_train - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.allclose(bundle.train.inputs, expect, atol=1e-5)
    assert abs(bundle.train.inputs.mean().item()) < 1e-5
    # record 0 (with the known pixel) lands in train or val, standardised with train statistics
    split, order = (bundle.train, tr) if 0 in tr.tolist() else (bundle.val, va)
    pixel = split.inputs[order.tolist().index(0), :, 3, 7]
    assert torch.allclose(pixel, (torch.tensor([11, 22, 33]) / 255 - mean) / std, atol=1e-5)
    again = load_cifar10(CIFAR10Config(root=str(root), val_fraction=0.2))
    assert torch.equal(again.val.inputs, bundle.val.inputs)


def test_cifar_truncated(cifar_dir):
    root = cifar_dir[0]
    path = root / "data_batch_1.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_1.bin"):
        load_cifar10(CIFAR10Config(root=str(root)))


def test_cifar_bad_label(cifar_dir):
    root = cifar_dir[0]
    path = root / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[3073 * 2] = 12  # label byte of record 2
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="test_batch.bin.*12"):
        load_cifar10(CIFAR10Config(root=str(root)))


def test_cifar_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(CIFAR10Config(root=str(tmp_path / "absent")))
    write_cifar10_binary(str(tmp_path / "data_batch_2.bin"), *_fake_cifar(3, 0))
    with pytest.raises(DataError, match="test_batch.bin"):
        load_cifar10(CIFAR10Config(root=str(tmp_path)))
    (tmp_path / "data_batch_2.bin").rename(tmp_path / "test_batch.bin")
    with pytest.raises(DataError, match="data_batch_1.bin"):
        load_cifar10(CIFAR10Config(root=str(tmp_path)))


def test_cifar_writer_rejects_bad_input(tmp_path):
    images, labels = _fake_cifar(2, 0)
    with pytest.raises(DataError, match="uint8"):
        write_cifar10_binary(str(tmp_path / "x.bin"), images.astype(np.float32), labels)
    with pytest.raises(DataError, match="0..9"):
        write_cifar10_binary(str(tmp_path / "x.bin"), images, np.array([1, 10]))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_classification():
    cfg = SyntheticConfig(num_samples=40, shape=[3, 4, 4], num_classes=5, seed=3)
    bundle = load_synthetic(cfg, None)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 5, 5)
    x, y = _all(bundle.train)
    assert x.shape == (40, 3, 4, 4) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() < 5
    assert bundle.input_shape == (3, 4, 4) and bundle.num_classes == 5
    again = load_synthetic(cfg, None)
    assert torch.equal(again.test.inputs, bundle.test.inputs)
    other = load_synthetic(SyntheticConfig(num_samples=40, shape=[3, 4, 4], seed=4))
    assert not torch.equal(other.train.inputs, bundle.train.inputs)
    assert len(load_synthetic(SyntheticConfig(num_samples=3, shape=[2])).val) == 1


def test_synthetic_lm():
    cfg = SyntheticConfig(task="lm", num_samples=16, shape=[12], num_classes=50, seed=1)
    bundle = load_synthetic(cfg, 8)
    assert bundle.task == "lm" and bundle.input_shape == (8,) and bundle.num_classes == 50
    x, y = _all(bundle.train)
    assert x.shape[1] == 8 and torch.equal(x[:, 1:], y[:, :-1]) and x.max() < 50
    assert len(bundle.val) == len(bundle.test) == 2
    assert torch.equal(_all(load_synthetic(cfg, 8).val)[0], _all(bundle.val)[0])
    assert load_synthetic(cfg, None).input_shape == (12,)
    with pytest.raises(DataError, match="256"):
        load_synthetic(SyntheticConfig(task="lm", num_classes=300, shape=[8]), 8)


# --------------------------------------------------------------------------- build_data


def test_build_data_dispatch(tmp_path):
    assert build_data(DigitsConfig()).name == "digits"
    assert build_data(SyntheticConfig(num_samples=8, shape=[1, 2, 2])).name == "synthetic"
    assert build_data(SyntheticConfig(task="lm", num_samples=8, shape=[4]), 4).input_shape == (4,)
    f = tmp_path / "t.txt"
    f.write_bytes(b"abcdefgh" * 100)
    assert build_data(TextConfig(paths=[str(f)]), 8).task == "lm"
    with pytest.raises(DataError, match="block_size"):
        build_data(TextConfig(paths=[str(f)]))
    write_cifar10_binary(str(tmp_path / "data_batch_1.bin"), *_fake_cifar(10, 0))
    write_cifar10_binary(str(tmp_path / "test_batch.bin"), *_fake_cifar(4, 1))
    bundle = build_data(CIFAR10Config(root=str(tmp_path)))
    assert isinstance(bundle.test, TensorSplit) and len(bundle.test) == 4
