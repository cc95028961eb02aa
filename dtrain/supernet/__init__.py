"""Weight-sharing supernets: elastic layers, search spaces, extraction, cost.

    from dtrain.supernet import build_supernet
    net = build_supernet({"space": "mbv3", ...})   # or the model dataclass
    arch = net.space.sample(random.Random(0))
    net.set_active(arch); logits = net(net.adapt_input(x))
    static = net.extract(arch); net.cost(arch)  # {"params": ..., "macs": ...}
"""

from __future__ import annotations

from .base import Supernet
from .space import ArchError, SearchSpace


def build_supernet(model_cfg) -> Supernet:
    """The supernet for a ``model`` config: a dict, an OmegaConf node or its dataclass."""
    from ..config import model_config_from

    cfg = model_config_from(model_cfg)
    if cfg.space == "mbv3":
        from .mbv3_net import MBV3Supernet

        return MBV3Supernet(cfg)
    from .gpt_net import GPTSupernet

    return GPTSupernet(cfg)


__all__ = ["build_supernet", "Supernet", "SearchSpace", "ArchError"]
