"""Weights & Biases sink: the same records as metrics.jsonl, flattened.

``step`` records log ``loss/<subnet>``, ``lr`` and ``samples_per_s`` at their
step; ``eval`` records log ``eval/<split>/<arch_name>/<metric>``. The mode
(online / offline / disabled) comes from ``logger.wandb.mode``.
"""

from __future__ import annotations

import os


class WandbSink:
    def __init__(self, cfg, run_dir: str, config: dict, name: str):
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode,
                              tags=list(cfg.tags), dir=run_dir, config=config, name=name,
                              reinit="finish_previous")

    def log(self, rec: dict) -> None:
        kind = rec.get("kind")
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

    def close(self) -> None:
        self.run.finish()
