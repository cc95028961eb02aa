"""``dtrain-export``: one subnet as a standalone model (Hydra app over conf/export.yaml).

dtrain-export checkpoint=runs/x pareto=runs/x/search/pareto.json index=2 out_dir=runs/x/export
"""

from __future__ import annotations

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    from ..search.export import run_export

    run_export(cfg)
    return 0


def outputs(cfg):
    return [("out_dir", cfg.out_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-export", "export", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
