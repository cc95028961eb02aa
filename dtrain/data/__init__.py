"""Data sources: digits (embedded default), text, CIFAR-10 binary, synthetic."""

from .base import DataBundle, DataError, Split, build_data

__all__ = ["DataBundle", "DataError", "Split", "build_data"]
