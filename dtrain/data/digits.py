"""scikit-learn's 8x8 handwritten digits: 1797 real images shipped with the package.

No download: the images live inside scikit-learn. The train/val/test split is
fixed by ``split_seed``; pixels are scaled to [0, 1] and standardised with the
train statistics.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

from ..config import DigitsConfig
from .base import DataBundle, DataError, TensorSplit, split_indices, standardise


def _read_digits():
    """(images [N, 8, 8] in 0..16, labels [N]) from scikit-learn's ``digits.csv.gz``.

    The file is read directly (what ``sklearn.datasets.load_digits`` reads) so
    that a process does not pay for importing scikit-learn; if the file is not
    where it was, scikit-learn's loader is used."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("data 'digits' needs scikit-learn (its digits file ships inside it): pip install scikit-learn")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.float64)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import (
        load_digits as _sk_load_digits,  # pragma: no cover - older layouts
    )

    raw = _sk_load_digits()
    return raw.images, raw.target


def load_digits(cfg: DigitsConfig) -> DataBundle:
    """The digits bundle: images float32 [N,1,8,8], labels long in 0..9."""
    images, target = _read_digits()
    images = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(target, dtype=torch.long)
    train, val, test = split_indices(len(images), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    x_train, x_val, x_test = standardise(images[train], images[val], images[test])
    return DataBundle(
        name="digits",
        task="classification",
        train=TensorSplit(x_train, labels[train]),
        val=TensorSplit(x_val, labels[val]),
        test=TensorSplit(x_test, labels[test]),
        num_classes=10,
        input_shape=(1, 8, 8),
        info={"samples": len(images)},
    )
