"""``dtrain-search``: evolutionary search of a trained supernet (Hydra app over conf/search.yaml).

dtrain-search checkpoint=runs/x out_dir=runs/x/search constraints.max_macs=2e6
torchrun --nproc-per-node 2 -m dtrain.cli.search checkpoint=runs/x out_dir=runs/x/search
"""

from __future__ import annotations

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    from ..search.run import run_search

    run_search(cfg)
    return 0


def outputs(cfg):
    return [("out_dir", cfg.out_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-search", "search", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
