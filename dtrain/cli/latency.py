"""``dtrain-latency``: build a latency table of a space's blocks (Hydra app over conf/latency.yaml).

dtrain-latency model=mbv3_tiny out=latency.json
dtrain-latency checkpoint=runs/x out=runs/x/latency.json device=cuda
"""

from __future__ import annotations

import json

from ..config import register_configs
from .app import run_app


def _task(cfg) -> int:
    import torch

    from ..obs.table import format_table
    from ..search.latency import build_table, check_table, predict_ms, save_table
    from ..supernet import build_supernet
    from ..train.distributed import pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, 0)
    if cfg.checkpoint:
        from ..checkpoint import load_checkpoint
        from ..config import model_config_from
        from ..search.source import resolve_checkpoint

        path, _ = resolve_checkpoint(cfg.checkpoint)
        model_cfg = model_config_from(json.loads(load_checkpoint(path)["model_config"]))
    else:
        model_cfg = cfg.model
    model = build_supernet(model_cfg)
    table = build_table(model, model_cfg, device, cfg.batch_size, cfg.warmup, cfg.repeats)
    if cfg.check:
        table["check"] = check_table(model, table, device, cfg.check, cfg.warmup, cfg.repeats)
    save_table(cfg.out, table)
    e = table["entries"]
    print(
        f"timed {len(e)} units of the {table['space']} space on {table['device']} "
        f"(batch {cfg.batch_size}, median of {cfg.repeats}): {min(e.values()):.3f}-{max(e.values()):.3f} ms each"
    )
    print(
        f"largest subnet {predict_ms(model, e, model.space.max()):.3f} ms, smallest "
        f"{predict_ms(model, e, model.space.min()):.3f} ms (predicted); wrote {cfg.out}"
    )
    if cfg.check:
        rows = [
            [r["name"], f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}", f"{r['ratio']:.2f}"]
            for r in table["check"]
        ]
        print(
            format_table(
                ["subnet", "predicted ms", "measured ms", "predicted / measured"],
                rows,
                title="the table against whole extracted subnets",
            )
        )
    return 0


def outputs(cfg):
    return [("out", cfg.out, "file")]


def main(argv=None) -> None:
    register_configs()
    run_app("dtrain-latency", "latency", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
