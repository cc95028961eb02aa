"""CIFAR-10 in its binary format (``data_batch_*.bin``, ``test_batch.bin``).

Each record is one label byte (0..9) then 3072 pixel bytes: the 1024 red, then
green, then blue values of a 32x32 image, row by row. Only this raw format is
read (never the pickled python version). Training records are split into
train/val with a fixed seeded permutation; ``test_batch.bin`` is the test split.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
import torch

from ..config import CIFAR10Config
from .base import DataBundle, DataError, TensorSplit, split_indices, standardise

RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
_CONTENTS = (
    "it must contain test_batch.bin and at least one of data_batch_1.bin .. data_batch_5.bin (CIFAR-10 binary version)"
)


def read_cifar10_binary(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Raw records of one file: images uint8 [N,3,32,32] and labels int64 [N]."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"CIFAR-10 file {path!r} cannot be read: {e.strerror}") from None
    if size == 0 or size % RECORD_BYTES:
        raise DataError(
            f"CIFAR-10 file {path!r} has {size} bytes: must be a positive multiple of "
            f"{RECORD_BYTES} (1 label byte + 3072 pixel bytes per record)"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(f"CIFAR-10 file {path!r} has label {labels[bad[0]]} at record {bad[0]}: labels must be in 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def write_cifar10_binary(path: str, images, labels) -> None:
    """Write uint8 images [N,3,32,32] (numpy or torch) and labels 0..9 in the binary format."""
    images = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images)
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise DataError(
            f"images of dtype {images.dtype} and shape {tuple(images.shape)} are not allowed: must be uint8 [N,3,32,32]"
        )
    if labels.shape != (len(images),):
        raise DataError(f"labels of shape {tuple(labels.shape)} are not allowed: must be [{len(images)}]")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"labels in {labels.min()}..{labels.max()} are not allowed: must be in 0..9")
    records = np.empty((len(images), RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(len(images), -1)
    records.tofile(path)


def find_cifar10_files(root: str) -> Tuple[List[str], str]:
    """The data batch paths present in ``root`` (in order) and the test batch path."""
    if not root or root == "???":
        raise DataError(f"data.root is not set: give the CIFAR-10 directory; {_CONTENTS}")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"CIFAR-10 directory {root!r} does not exist: {_CONTENTS}")
    nested = os.path.join(root, "cifar-10-batches-bin")  # the layout of the official archive
    if not os.path.exists(os.path.join(root, TEST_FILE)) and os.path.isdir(nested):
        root = nested
    train = [os.path.join(root, f) for f in TRAIN_FILES if os.path.isfile(os.path.join(root, f))]
    test = os.path.join(root, TEST_FILE)
    missing = ([] if train else ["data_batch_1.bin .. data_batch_5.bin"]) + (
        [] if os.path.isfile(test) else [TEST_FILE]
    )
    if missing:
        raise DataError(f"CIFAR-10 directory {root!r} lacks {' and '.join(missing)}: {_CONTENTS}")
    return train, test


def load_cifar10(cfg: CIFAR10Config) -> DataBundle:
    """The CIFAR-10 bundle: images float32 [N,3,32,32] standardised with train statistics."""
    train_paths, test_path = find_cifar10_files(cfg.root)
    parts = [read_cifar10_binary(p) for p in train_paths]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    test_images, test_labels = (torch.from_numpy(a) for a in read_cifar10_binary(test_path))
    train_idx, val_idx, _ = split_indices(len(images), cfg.val_fraction, 0.0, cfg.split_seed)
    x_train, x_val, x_test = standardise(
        *(t.float() / 255.0 for t in (images[train_idx], images[val_idx], test_images))
    )
    return DataBundle(
        name="cifar10",
        task="classification",
        train=TensorSplit(x_train, labels[train_idx]),
        val=TensorSplit(x_val, labels[val_idx]),
        test=TensorSplit(x_test, test_labels),
        num_classes=10,
        input_shape=(3, 32, 32),
        info={"files": train_paths + [test_path]},
    )
