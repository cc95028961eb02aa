"""``dtrain-sim``: a local multi-peer run with WAN emulation and chaos (Hydra app over conf/sim.yaml).

    dtrain-sim                                   # the demo: 3 peers, one killed, one joining
    dtrain-sim sim.peers=4 chaos.kill_every_s=[5,10] chaos.restart_after_s=3
    dtrain-sim run_dir=runs/sim-x resume=true    # whole-cluster restart from the run's checkpoints

Prints a summary table; exit status 1 when parity failed, a committed round
was lost, or the run did not reach ``sim.rounds``; 2 for config mistakes.
"""

from __future__ import annotations

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    from ..sim.cluster import Simulation
    from ..sim.summary import summary_table

    summary = Simulation(cfg).run()
    print(summary_table(summary), flush=True)
    print(f"run dir: {cfg.run_dir}", flush=True)
    return 0 if summary["ok"] else 1


def outputs(cfg):
    return [("run_dir", cfg.run_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-sim", "sim", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
