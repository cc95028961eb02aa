"""Weights & Biases sink: the same records as metrics.jsonl, flattened, and the report's plots at the end.

``step`` records log ``loss/<subnet>``, ``lr`` and ``samples_per_s`` at their
step; ``eval`` records log ``eval/<split>/<arch_name>/<metric>``. On close,
the figures ``dtrain-report`` draws (``obs.report``) are built from the run
dir's metrics.jsonl and logged as ``report/<name>`` images at the last step
before the run finishes. The mode (online / offline / disabled) comes from
``logger.wandb.mode``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from .report import render_plots
from .run_reader import load_run

log = logging.getLogger("dtrain")


class WandbSink:
    def __init__(self, cfg, run_dir: str, config: dict, name: str):
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self._wandb = wandb
        self.run_dir = run_dir
        self.mode = cfg.mode
        self.last_step = 0
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            tags=list(cfg.tags),
            dir=run_dir,
            config=config,
            name=name,
            reinit="finish_previous",
        )

    def log(self, rec: dict) -> None:
        kind = rec.get("kind")
        if isinstance(rec.get("step"), int):
            self.last_step = max(self.last_step, rec["step"])
        if kind == "step":
            data = {f"loss/{k}": v for k, v in rec.get("loss", {}).items()}
            data.update({k: rec[k] for k in ("lr", "samples_per_s") if k in rec})
            self.run.log(data, step=rec["step"])
        elif kind == "eval":
            prefix = f"eval/{rec.get('split', 'val')}/{rec['arch_name']}"
            data = {f"{prefix}/{k}": rec[k] for k in ("acc", "loss", "bpb") if rec.get(k) is not None}
            self.run.log(data, step=rec["step"])
        elif kind == "summary":
            for k, v in rec.items():
                if isinstance(v, (int, float)):
                    self.run.summary[k] = v

    def log_report(self) -> int:
        """Log the report's figures of this run dir as images; the number logged."""
        tmp = tempfile.mkdtemp(prefix="dtrain-report-")
        try:
            plots = render_plots(load_run(self.run_dir), tmp, dpi=100)
            images = {
                f"report/{name[: -len('.png')]}": self._wandb.Image(os.path.join(tmp, name), caption=title)
                for name, title, why in plots
                if why is None
            }
            if images:
                self.run.log(images, step=self.last_step)
            return len(images)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        if self.mode != "disabled":
            try:
                self.log_report()
            except Exception as e:  # a figure that cannot be drawn must not lose the end of the run
                log.warning("wandb: the report's plots were not logged: %s", e)
        self.run.finish()
