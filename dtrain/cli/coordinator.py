"""``dtrain-coordinator``: the control-plane server (Hydra app over conf/coordinator.yaml).

dtrain-coordinator port=0 state_dir=runs/coord
# first stdout line: coordinator listening on 127.0.0.1:PORT
"""

from __future__ import annotations

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    from ..control.server import serve

    return serve(cfg)


def outputs(cfg):
    return [("state_dir", cfg.state_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-coordinator", "coordinator", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
