"""``dtrain-train``: train one peer's supernet (Hydra app over conf/train.yaml).

dtrain-train                                  # tiny mbv3 on digits
dtrain-train model=gpt_tiny data=text steps=2000
torchrun --nproc-per-node 2 -m dtrain.cli.train run_dir=runs/x
"""

from __future__ import annotations

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    from ..train.loop import train

    train(cfg)
    return 0


def outputs(cfg):
    return [("run_dir", cfg.run_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-train", "train", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
