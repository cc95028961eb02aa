"""``dtrain-search`` end to end: load, score, evolve, write the Pareto front.

Outputs in ``out_dir``: ``pareto.json`` (every Pareto point: index, arch,
accuracy, loss (bpb for language models), MACs, params, predicted latency,
plus how the search ran), ``candidates.jsonl`` (every evaluated candidate),
``pareto.png``; a table of the front is printed. Under torchrun every rank
runs the same search and scores its share of each generation; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from ..atomic_io import atomic_write_bytes
from ..config import ConfigError
from ..data import build_data
from ..obs.pareto_plot import plot_pareto
from ..obs.table import format_table, human
from ..supernet.budget import Budget
from ..train.distributed import init_distributed, shutdown_distributed
from ..train.evaluate import calibration_batches
from ..train.model_data import check_model_data
from ..train.seeds import derive_seed
from .evolution import EvolutionarySearch
from .scorer import SubnetScorer
from .source import load_source

log = logging.getLogger("dtrain")


def prepare(cfg, ctx):
    """(source, data, scorer, budget) for a search or an export config."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    src = load_source(cfg.checkpoint, ctx.device, cfg.data)
    data = build_data(src.data_cfg, getattr(src.model_cfg, "block_size", None))
    check_model_data(src.model, data, src.model_cfg)
    split = getattr(data, cfg.eval.split)
    if len(split) == 0:
        raise ConfigError(f"eval.split={cfg.eval.split!r} is empty for data {data.name!r}: choose val or test")
    calib = calibration_batches(
        data.train, cfg.eval.calib_batches, cfg.eval.calib_batch_size, derive_seed(src.seed, "calib")
    )
    scorer = SubnetScorer(src.model, split, calib, cfg.eval.batch_size, ctx.device, ctx.rank, ctx.world_size)
    return src, data, scorer


def point(c: dict, index: int) -> dict:
    m, cost = c["metrics"], c["cost"]
    out = {
        "index": index,
        "arch": c["arch"],
        "accuracy": m["acc"],
        "loss": m["loss"],
        "macs": cost["macs"],
        "params": cost["params"],
        "latency_ms": cost["latency_ms"],
        "generation": c["generation"],
    }
    if "bpb" in m:
        out["bpb"] = m["bpb"]
    return out


def arch_summary(arch: dict) -> str:
    """A short one-line view of an arch for tables."""
    parts = []
    for k, v in sorted(arch.items()):
        parts.append(f"{k}={''.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(parts)


def run_search(cfg) -> dict:
    t0 = time.time()
    ctx = init_distributed(cfg.device)
    clean = False
    try:
        src, data, scorer = prepare(cfg, ctx)
        budget = Budget(src.model, src.model_cfg, cfg.constraints)
        budget.check_reachable()
        leader = ctx.is_leader

        def progress(gen, cands):
            if leader:
                best = max((c for c in cands if c["feasible"]), key=lambda c: c["score"], default=None)
                print(
                    f"generation {gen}: {len(cands)} evaluated, best score {best['score']:.4f}"
                    if best
                    else f"generation {gen}: nothing feasible yet",
                    flush=True,
                )

        search = EvolutionarySearch(
            src.model.space,
            cfg.evolution,
            scorer,
            budget.cost,
            budget.violation,
            cost_key="macs",
            predictor_cfg=cfg.predictor,
            on_generation=progress,
        )
        result = search.run()
        out = _report(cfg, src, data, result, time.time() - t0)
        if leader:
            _write(cfg, src, result, out)
        clean = True
        return out
    finally:
        shutdown_distributed(barrier=clean)


def _report(cfg, src, data, result, seconds: float) -> dict:
    cands = result.candidates
    front = [point(cands[i], j) for j, i in enumerate(result.front)]
    roles = {c["role"]: c for c in cands if c["role"]}
    return {
        "version": 1,
        "checkpoint": src.info.get("checkpoint"),
        "source": src.info,
        "space": src.model.space.name,
        "data": data.name,
        "split": cfg.eval.split,
        "metric": "bpb" if src.model.task == "lm" else "accuracy",
        "constraints": {
            k: getattr(cfg.constraints, k) for k in ("max_macs", "max_params", "max_latency_ms", "latency_table")
        },
        "evolution": {
            k: getattr(cfg.evolution, k)
            for k in ("population", "generations", "parents", "mutate_prob", "crossover_fraction", "seed")
        },
        "evaluated": len(cands),
        "seconds": round(seconds, 2),
        "predictor": {
            "enabled": cfg.predictor.enabled,
            "spearman": result.predictor_spearman,
            "held_out": result.predictor_held_out,
        },
        "largest": point(roles["largest"], -1) if "largest" in roles else None,
        "smallest": point(roles["smallest"], -1) if "smallest" in roles else None,
        "pareto": front,
    }


def _write(cfg, src, result, out: dict) -> None:
    os.makedirs(cfg.out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(cfg.out_dir, "pareto.json"), (json.dumps(out, indent=1) + "\n").encode())
    lines = [json.dumps({k: v for k, v in c.items() if k != "key"}) for c in result.candidates]
    atomic_write_bytes(os.path.join(cfg.out_dir, "candidates.jsonl"), ("\n".join(lines) + "\n").encode())
    plot_pareto(
        result.candidates,
        result.front,
        os.path.join(cfg.out_dir, "pareto.png"),
        metric=out["metric"],
        title=f"{out['space']} on {out['data']} ({out['split']}): {out['evaluated']} subnets evaluated",
    )
    print(results_table(out, cfg.show), flush=True)
    rho = out["predictor"]["spearman"]
    if out["predictor"]["enabled"]:
        print(
            f"accuracy predictor: Spearman rank correlation {rho:.3f} on {out['predictor']['held_out']} held-out "
            "evaluations"
            if rho is not None
            else "accuracy predictor: too few held-out evaluations to rank"
        )
    print(f"wrote {cfg.out_dir}/pareto.json, pareto.png, candidates.jsonl", flush=True)


def results_table(out: dict, show: int) -> str:
    metric = out["metric"]
    rows = []
    pts = out["pareto"]
    if show and len(pts) > show:  # spread the shown rows over the cost range
        step = (len(pts) - 1) / (show - 1) if show > 1 else 1
        pts = [pts[round(i * step)] for i in range(show)] if show > 1 else pts[-1:]
    for p in pts:
        lat = f"{p['latency_ms']:.3f}" if p["latency_ms"] is not None else "-"
        val = f"{p['bpb']:.4f}" if metric == "bpb" else f"{100 * p['accuracy']:.2f}"
        rows.append([p["index"], human(p["macs"]), human(p["params"]), lat, val, arch_summary(p["arch"])])
    head = ["#", "MACs", "params", "latency ms", "bpb" if metric == "bpb" else "acc %", "arch"]
    return format_table(
        head,
        rows,
        title=f"Pareto front ({len(out['pareto'])} points of {out['evaluated']} evaluated, {out['split']} split)",
    )
