"""Data sources: digits (embedded default), text, CIFAR-10 binary, synthetic.

    bundle = build_data(cfg.data, seq_len)   # train / val / test splits that hand out batches by index

One registry, :data:`DATA_SOURCES` (config class -> loader); the source names
are ``dtrain.config.DATA_CONFIGS``' (the one list).
"""

from typing import Callable, Dict, Optional

from ..config import (
    DATA_CONFIGS,
    CIFAR10Config,
    DigitsConfig,
    SyntheticConfig,
    TextConfig,
    data_config_from,
)
from .base import DataBundle, DataError, Split
from .cifar10 import load_cifar10
from .digits import load_digits
from .synthetic import load_synthetic
from .text import load_text


def _need_seq_len(seq_len: Optional[int], name: str) -> int:
    if not seq_len:
        raise DataError(f"data {name!r} is language modelling: it needs a model with block_size")
    return seq_len


# data config -> loader(cfg, seq_len)
DATA_SOURCES: Dict[type, Callable[..., DataBundle]] = {
    DigitsConfig: lambda cfg, seq_len: load_digits(cfg),
    TextConfig: lambda cfg, seq_len: load_text(cfg, _need_seq_len(seq_len, cfg.name)),
    CIFAR10Config: lambda cfg, seq_len: load_cifar10(cfg),
    SyntheticConfig: lambda cfg, seq_len: load_synthetic(cfg, seq_len),
}
if set(DATA_SOURCES) != set(DATA_CONFIGS.values()):  # pragma: no cover - a source added to one list only
    raise ImportError(
        f"dtrain.data loads {sorted(c.__name__ for c in DATA_SOURCES)}, "
        f"dtrain.config.DATA_CONFIGS lists {sorted(DATA_CONFIGS)}"
    )


def build_data(cfg, seq_len: Optional[int] = None) -> DataBundle:
    """The data bundle for a data config (dataclass, dict or OmegaConf node). ``seq_len`` is needed for lm
    data."""
    cfg = data_config_from(cfg)  # a dataclass as it is; a dict or an OmegaConf node checked
    load = DATA_SOURCES.get(type(cfg))
    if load is None:
        raise DataError(f"data.name={cfg.name!r} is not allowed: choose one of " + ", ".join(DATA_CONFIGS))
    return load(cfg, seq_len)


__all__ = ["DataBundle", "DataError", "Split", "build_data", "DATA_SOURCES"]
