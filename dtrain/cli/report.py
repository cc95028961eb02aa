"""``dtrain-report``: plots and report.md of a run directory (Hydra app over conf/report.yaml).

    dtrain-report run_dir=runs/sim-x [out_dir=...] [dpi=110]

Prints the files written, one per line. A run_dir that is missing, not a
directory, not a run, or holds a corrupt metrics line is one line on stderr
naming it, exit status 2.
"""

from __future__ import annotations

import os

from ..config import register_configs
from .app import run_app

PROG = "dtrain-report"


def _task(cfg) -> int:
    from ..obs.report import write_report

    files = write_report(cfg.run_dir, cfg.out_dir, cfg.dpi)
    try:
        print("\n".join(files), flush=True)
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return 0


def outputs(cfg):
    """out_dir; its default (run_dir/report) only once run_dir is a directory (else run_dir's own error)."""
    if cfg.out_dir:
        return [("out_dir", cfg.out_dir, "dir")]
    if cfg.run_dir and os.path.isdir(cfg.run_dir):
        return [("out_dir", os.path.join(cfg.run_dir, "report"), "dir")]
    return []


def main(argv=None) -> None:
    register_configs()
    run_app(PROG, "report", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
