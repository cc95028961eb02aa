"""scikit-learn's 8x8 handwritten digits: 1797 real images shipped with the package.

No download: the images live inside scikit-learn. The train/val/test split is
fixed by ``split_seed``; pixels are scaled to [0, 1] and standardised with the
train statistics.
"""

from __future__ import annotations

import torch

from ..config import DigitsConfig
from .base import DataBundle, DataError, TensorSplit, split_indices, standardise


def load_digits(cfg: DigitsConfig) -> DataBundle:
    """The digits bundle: images float32 [N,1,8,8], labels long in 0..9."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(f"data 'digits' needs scikit-learn, which cannot be imported: {e}") from None
    raw = _sk_load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(raw.target, dtype=torch.long)
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
