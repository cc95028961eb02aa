"""Data sources: digits (embedded default), text, CIFAR-10 binary, synthetic."""

from typing import Callable, Dict, Optional

from ..config import DATA_CONFIGS, CIFAR10Config, DigitsConfig, SyntheticConfig, TextConfig
from .base import DataBundle, DataError, Split, _need_seq_len, build_data


def _digits(cfg: DigitsConfig, seq_len: Optional[int]) -> DataBundle:
    from .digits import load_digits
    return load_digits(cfg)


def _text(cfg: TextConfig, seq_len: Optional[int]) -> DataBundle:
    from .text import load_text
    return load_text(cfg, _need_seq_len(seq_len, cfg.name))


def _cifar10(cfg: CIFAR10Config, seq_len: Optional[int]) -> DataBundle:
    from .cifar10 import load_cifar10
    return load_cifar10(cfg)


def _synthetic(cfg: SyntheticConfig, seq_len: Optional[int]) -> DataBundle:
    from .synthetic import load_synthetic
    return load_synthetic(cfg, seq_len)


# data config -> loader(cfg, seq_len); the source names are dtrain.config.DATA_CONFIGS' (the one list)
DATA_SOURCES: Dict[type, Callable[..., DataBundle]] = {
    DigitsConfig: _digits, TextConfig: _text, CIFAR10Config: _cifar10, SyntheticConfig: _synthetic,
}
if set(DATA_SOURCES) != set(DATA_CONFIGS.values()):  # pragma: no cover - a source added to one list only
    raise ImportError(f"dtrain.data loads {sorted(c.__name__ for c in DATA_SOURCES)}, "
                      f"dtrain.config.DATA_CONFIGS lists {sorted(DATA_CONFIGS)}")

__all__ = ["DataBundle", "DataError", "Split", "build_data", "DATA_SOURCES"]
