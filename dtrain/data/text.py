"""Byte-level language modelling on local text files.

The files' bytes are joined (a newline between files) into one stream that is
cut contiguously into train, val and test. Train has a window at every offset;
val and test use non-overlapping windows. With no paths configured the corpus
is a fixed set of files from the Python standard library, so it works offline
on any CPython 3.11 installation.
"""

from __future__ import annotations

import math
import os
import sysconfig
from typing import List, Sequence

import numpy as np
import torch

from ..config import TextConfig
from .base import DataBundle, DataError, WindowSplit

# Relative to sysconfig.get_paths()["stdlib"]; about 1 MB of English prose and Python source.
DEFAULT_TEXT_FILES = (  # the documentation last: val and test are held-out English prose
    "this.py",
    "textwrap.py",
    "difflib.py",
    "argparse.py",
    "contextlib.py",
    "pydoc_data/topics.py",
)


def default_text_paths() -> List[str]:
    """Absolute paths of :data:`DEFAULT_TEXT_FILES` in this interpreter's stdlib."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return [os.path.join(stdlib, *rel.split("/")) for rel in DEFAULT_TEXT_FILES]


def read_corpus(paths: Sequence[str]) -> bytes:
    """The files' bytes in order, separated by one newline byte."""
    parts = []
    for path in paths:
        try:
            with open(os.path.expanduser(path), "rb") as f:
                parts.append(f.read())
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise DataError(f"text file {path!r} cannot be read: {reason}") from None
    return b"\n".join(parts)


def unigram_bits_per_byte(train: np.ndarray, val: np.ndarray) -> float:
    """Bits per byte on ``val`` of a byte-frequency model of ``train`` (add-one smoothing)."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    log2p = np.log2(counts) - math.log2(counts.sum())
    return float(-log2p[val].mean())


def load_text(cfg: TextConfig, seq_len: int) -> DataBundle:
    """The text bundle: windows of ``seq_len`` bytes, targets the next byte."""
    seq_len = int(seq_len)
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} is not allowed: must be >= 1")
    paths = [str(p) for p in cfg.paths] if cfg.paths else default_text_paths()
    raw = read_corpus(paths)
    if cfg.max_bytes > 0:
        raw = raw[: cfg.max_bytes]
    n = len(raw)
    n_val = int(round(n * cfg.val_fraction))
    n_test = int(round(n * cfg.test_fraction))
    n_train = n - n_val - n_test
    need = seq_len + 1
    if min(n_val, n_test) < need:
        raise DataError(
            f"data.val_fraction={cfg.val_fraction} and data.test_fraction={cfg.test_fraction} "
            f"of {n} bytes give val/test parts of {n_val}/{n_test} bytes: each needs at least "
            f"seq_len+1={need} bytes (raise the fractions or use more text)"
        )
    if n_train < need:
        raise DataError(
            f"the train part of {n_train} bytes (of {n}) is shorter than seq_len+1={need} "
            "bytes: lower data.val_fraction/data.test_fraction or use more text"
        )
    arr = np.frombuffer(raw, dtype=np.uint8)
    data = torch.from_numpy(arr.copy())
    train = data[:n_train]
    val = data[n_train : n_train + n_val]
    test = data[n_train + n_val :]
    return DataBundle(
        name="text",
        task="lm",
        train=WindowSplit(train, seq_len, stride=1),
        val=WindowSplit(val, seq_len, stride=seq_len),
        test=WindowSplit(test, seq_len, stride=seq_len),
        num_classes=256,
        input_shape=(seq_len,),
        info={
            "unigram_bpb": unigram_bits_per_byte(arr[:n_train], arr[n_train : n_train + n_val]),
            "bytes": n,
            "files": paths,
        },
    )
