"""Weight-sharing supernets: elastic layers, search spaces, extraction, cost.

from dtrain.supernet import build_supernet
net = build_supernet({"space": "mbv3", ...})   # or the model dataclass
arch = net.space.sample(random.Random(0))
net.set_active(arch); logits = net(net.adapt_input(x))
static = net.extract(arch); net.cost(arch)  # {"params": ..., "macs": ...}
"""

from __future__ import annotations

from typing import Callable, Dict

from ..config import MODEL_CONFIGS, GPTConfig, MBV3Config, model_config_from
from .base import Supernet
from .gpt_net import GPTSupernet
from .mbv3_net import MBV3Supernet
from .space import ArchError, SearchSpace

# space config -> supernet; the space names are dtrain.config.MODEL_CONFIGS' (the one list)
SUPERNETS: Dict[type, Callable[..., Supernet]] = {MBV3Config: MBV3Supernet, GPTConfig: GPTSupernet}
if set(SUPERNETS) != set(MODEL_CONFIGS.values()):  # pragma: no cover - a space added to one list only
    raise ImportError(
        f"dtrain.supernet builds {sorted(c.__name__ for c in SUPERNETS)}, "
        f"dtrain.config.MODEL_CONFIGS lists {sorted(MODEL_CONFIGS)}"
    )


def build_supernet(model_cfg) -> Supernet:
    """The supernet for a ``model`` config: a dict, an OmegaConf node or its dataclass."""
    cfg = model_config_from(model_cfg)
    return SUPERNETS[type(cfg)](cfg)


__all__ = ["build_supernet", "Supernet", "SearchSpace", "ArchError", "SUPERNETS"]
