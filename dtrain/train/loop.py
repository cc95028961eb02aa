"""The inner training loop of one peer (one process or the ranks of a torchrun job).

Per step t:
  1. the schedule says which subnets train (``shrink.ShrinkSchedule``);
  2. the archs come from a seed derived from (seed, t, peer id): every rank
     trains the same subnets, and no sampler state needs saving;
  3. the global batch comes from the seeded ``BatchSampler``; each rank takes
     its shard and splits it into ``grad_accum`` micro-batches;
  4. ``sandwich_backward`` accumulates the gradients of the whole sandwich;
  5. ONE bucketed all-reduce averages gradients (and the losses) across ranks;
  6. gradient clipping and ONE optimizer step; the LR schedule advances.

Evaluation (BN recalibrated first) runs every ``eval_every`` steps and at the
end; checkpoints are written atomically every ``checkpoint_every`` steps and
at the end. Records go to ``${run_dir}/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import ConfigError, TrainConfig
from ..data import build_data
from ..data.base import DataError
from ..obs.metrics import MetricsWriter
from ..obs.progress import Progress
from ..obs.table import format_table, human
from ..peer.factory import build_outer_component
from ..peer.round_event import RoundEvent
from ..supernet import build_supernet
from ..supernet.calibrate import batch_norms
from ..supernet.capacity import capacity_ladder
from ..supernet.coverage import slice_masks
from ..wire.outcomes import RoundOutcome
from .distributed import (
    DistContext,
    GradientSync,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from .evaluate import calibration_batches, evaluate_arch
from .lr_schedule import WarmupCosine
from .model_data import check_model_data, check_task
from .optim import build_optimizer
from .sampler import BatchSampler, shard
from .sandwich import sandwich_backward
from .seeds import derive_seed, rng_for
from .shrink import ShrinkSchedule
from .state_hash import param_hash

log = logging.getLogger("dtrain")

CHECKPOINT_VERSION = 1


def resolve_eval_archs(names: List[str], space, seed: int) -> List[Tuple[str, dict]]:
    """Named archs to evaluate: ``max``, ``min`` and ``rand<k>`` (seeded random)."""
    out = []
    for name in names:
        if name == "max":
            out.append((name, space.max()))
        elif name == "min":
            out.append((name, space.min()))
        elif name.startswith("rand") and name[4:].isdigit():
            out.append((name, space.sample(rng_for(seed, "eval", int(name[4:])))))
        else:
            raise ConfigError(f"eval_archs entry {name!r} is not allowed: use max, min or rand<k> (e.g. rand0)")
    return out


def step_archs(space, plan, seed: int, step: int, peer_id: str, num_random: int, top: Optional[dict] = None):
    """(name, arch) pairs trained at ``step``: the largest first. A capped peer (``top``: its top arch)
    trains its top arch, the smallest arch and random archs inside the top."""
    archs = [("max", space.max() if top is None else top)]
    if not plan.small:
        return archs
    rng = rng_for(seed, "arch", step, peer_id)
    if top is None:
        archs.append(("min", space.min(plan.elastic)))
        archs += [(f"rand{i}", space.sample(rng, plan.elastic)) for i in range(num_random)]
    else:
        archs.append(("min", space.min_within(top, plan.elastic)))
        archs += [(f"rand{i}", space.sample_within(top, rng, plan.elastic)) for i in range(num_random)]
    return archs


class Trainer:
    """Builds everything from a ``TrainConfig`` and runs the loop; see the module docstring."""

    def __init__(self, cfg: TrainConfig, ctx: Optional[DistContext] = None):
        self.cfg = cfg
        wait = cfg.outer.sync_timeout_s + 120.0 if cfg.outer.name != "none" else 300.0
        self.ctx = ctx or init_distributed(cfg.device, timeout_s=wait)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        c, ctx = cfg, self.ctx
        per_rank = c.batch_size // ctx.world_size
        if c.batch_size % (ctx.world_size * c.grad_accum):
            raise ConfigError(
                f"batch_size={c.batch_size} is not allowed: it must divide evenly into "
                f"{ctx.world_size} rank(s) x grad_accum={c.grad_accum} micro-batches"
            )
        self.micro = per_rank // c.grad_accum
        self.run_dir = self._agree_run_dir(c.run_dir)
        torch.manual_seed(derive_seed(c.seed, "init"))
        self.model = build_supernet(c.model).to(ctx.device)
        check_task(self.model, c.model, c.data)
        seq_len = getattr(c.model, "block_size", None)
        self.data = build_data(c.data, seq_len)
        check_model_data(self.model, self.data, c.model)
        if len(self.data.train) == 0:
            raise DataError(f"data {self.data.name!r} has an empty train split")
        self.space = self.model.space
        # a capped peer trains only archs inside its top arch (None: the whole supernet)
        # capacity=auto: the top archs it may step down to; the outer loop picks the level (RoundEvent)
        self.ladder = capacity_ladder(self.model, c.model, c.capacity)
        self.top_arch = self.ladder[0]
        self.slice = slice_masks(self.model, self.top_arch) if self.top_arch is not None else None
        self.eval_archs = resolve_eval_archs(c.eval_archs, self.space, c.seed)
        self.shrink = ShrinkSchedule(c.sandwich, self.space.dims, c.model.progressive_order, c.steps)
        if ctx.enabled:
            broadcast_module(self.model)
        self.optimizer = build_optimizer(self.model, c.optim)
        self.scheduler = WarmupCosine(self.optimizer, c.optim.lr, c.optim.warmup_steps, c.steps, c.optim.min_lr_ratio)
        # each peer draws its own batch order (DiLoCo workers train on different data)
        self.sampler = BatchSampler(len(self.data.train), c.batch_size, derive_seed(c.seed, "data", c.peer_id))
        self.grad_sync = GradientSync(self.model, c.bucket_mb, ctx)
        self.calib = calibration_batches(
            self.data.train, c.calib_batches, c.calib_batch_size, derive_seed(c.seed, "calib"), ctx.rank, ctx.world_size
        )
        self.step = 0
        self.stall_s = 0.0  # time inner steps waited for an overlapped exchange
        self.stop_requested: Optional[str] = None  # set by SIGTERM / SIGINT
        self.stop_everywhere = False
        self.outer = build_outer_component(
            c,
            self.model,
            self.optimizer,
            is_leader=ctx.is_leader,
            world_size=ctx.world_size,
            distributed=ctx.enabled,
            run_dir=self.run_dir,
            should_stop=lambda: self.stop_requested is not None,
            ladder=self.ladder,
            slice_masks=self.slice,
        )
        self.metrics: Optional[MetricsWriter] = None
        self.ckpt_path = os.path.join(self.run_dir, "checkpoints", "latest.pt")

    # -- setup helpers -----------------------------------------------------------------
    def _agree_run_dir(self, run_dir: str) -> str:
        """Every rank writes under rank 0's run_dir (its clock picks ${now:...})."""
        if self.ctx.enabled:
            box = [run_dir]
            dist.broadcast_object_list(box, src=0)
            run_dir = box[0]
        return run_dir

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.cfg)

    def _open_outputs(self) -> None:
        if not self.ctx.is_leader:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        sinks = []
        if self.cfg.logger.name == "wandb":
            from ..obs.wandb_sink import WandbSink

            sinks.append(WandbSink(self.cfg.logger.wandb, self.run_dir, self.config_dict(), name=f"{self.cfg.peer_id}"))
        self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), sinks)
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config_dict(), f, indent=2)

    def _record(self, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(rec)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "model_config": json.dumps(dataclasses.asdict(self.cfg.model), sort_keys=True),
            "peer_id": self.cfg.peer_id,
        }
        outer = self.outer.state_dict() if self.outer is not None else {}
        if outer:
            st["outer"] = outer
        return st

    def save(self) -> None:
        if self.ctx.is_leader:
            save_checkpoint(self.ckpt_path, self.state_dict())

    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)
        mine = json.dumps(dataclasses.asdict(self.cfg.model), sort_keys=True)
        if state.get("model_config") != mine:
            raise ConfigError(
                f"resume=true but {path} was written for another model config: "
                "use the same model.* settings or a new run_dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if self.outer is not None and "outer" in state:
            try:
                self.outer.load_state_dict(state["outer"])
            except ConfigError as e:
                raise ConfigError(f"resume=true but {path}: {e}") from None

    # -- one step ------------------------------------------------------------------------
    def micro_batches(self, indices: torch.Tensor):
        mine = shard(indices, self.ctx.rank, self.ctx.world_size)
        out = []
        for i in range(self.cfg.grad_accum):
            x, y = self.data.train.batch(mine[i * self.micro : (i + 1) * self.micro])
            out.append((x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)))
        return out

    def train_step(self) -> Dict[str, float]:
        c = self.cfg
        plan = self.shrink.at(self.step)
        archs = step_archs(self.space, plan, c.seed, self.step, c.peer_id, c.sandwich.num_random, self.top_arch)
        if plan.small and plan.weight <= 0:
            archs = archs[:1]
        batches = self.micro_batches(self.sampler.next())
        first = self.ctx.rank * c.grad_accum  # global index of this rank's first micro-batch
        seeds = [derive_seed(c.seed, "dropout", self.step, c.peer_id, first + i) for i in range(len(batches))]
        self.model.train()
        losses = sandwich_backward(self.model, batches, archs, plan.weight, c.sandwich, seeds)
        names = list(losses)
        # the stop request rides in the same all-reduce: every rank learns it at the same step
        synced = self.grad_sync.sync([losses[n] for n in names] + [float(self.stop_requested is not None)])
        self.stop_everywhere = synced[-1] > 0
        losses = dict(zip(names, synced[:-1]))
        if self.outer is not None:
            event = self._on_round(self.outer.before_optimizer_step(self.step))
            if event.outcome in (RoundOutcome.HEAL, RoundOutcome.STOP):  # the adopted state replaces this step
                self.optimizer.zero_grad(set_to_none=True)
                return losses
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.outer is not None:
            self._on_round(self.outer.after_optimizer_step(self.step))
        return losses

    def _emulate_speed(self, seconds: float) -> float:
        """``emulated_speed`` < 1: make the step last 1/speed of its natural time (sleep the difference);
        returns the step's time as the machine delivered it."""
        speed = self.cfg.emulated_speed
        if speed >= 1.0:
            return seconds
        extra = seconds * (1.0 / speed - 1.0)
        time.sleep(extra)
        return seconds + extra

    def jump_to_step(self, step: int) -> None:
        """Continue from ``step`` (after adopting a newer global state): LR schedule included."""
        self.step = int(step)
        self.scheduler.load_state_dict({"step_num": self.step})

    def _on_round(self, event: RoundEvent) -> RoundEvent:
        """Act on what a round boundary did: the trainer alone moves its step, checkpoints, records and
        stops."""
        if event.capacity_level >= 0 and self.ladder[event.capacity_level] != self.top_arch:
            self.top_arch = self.ladder[event.capacity_level]  # capacity=auto stepped to another top arch
            log.info("capacity: now training within %s", self.space.key(self.top_arch or self.space.max()))
        if event.outcome in (RoundOutcome.HEAL, RoundOutcome.COMMIT) and event.step != self.step:
            self.jump_to_step(event.step)  # a heal, or a balanced round this peer trained fewer steps of
        self.stall_s += event.stall_s
        if event.checkpoint:
            self.save()  # S_{r+1} (or the adopted S_R) on disk: a restart continues from here
        for rec in event.records:
            self._record(rec)
        if event.outcome is RoundOutcome.STOP:  # the leader abandoned a round to shut down: every rank leaves
            self.stop_requested = self.stop_requested or "SIGTERM"
            self.stop_everywhere = True
        return event

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split_name: str = "val") -> List[dict]:
        split = getattr(self.data, split_name)
        if len(split) == 0:
            return []
        recs = []
        for name, arch in self.eval_archs:
            res = evaluate_arch(
                self.model,
                arch,
                split,
                self.calib,
                self.cfg.eval_batch_size,
                self.ctx.device,
                self.model.task,
                self.ctx.rank,
                self.ctx.world_size,
            )
            cost = self.model.cost(arch)
            rec = {
                "kind": "eval",
                "step": self.step,
                "split": split_name,
                "arch_name": name,
                "arch": arch,
                "acc": res["acc"],
                "loss": res["loss"],
                "params": cost["params"],
                "macs": cost["macs"],
            }
            if "bpb" in res:
                rec["bpb"] = res["bpb"]
            recs.append(rec)
            self._record(rec)
        return recs

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        resumed = False
        if c.resume:
            if os.path.exists(self.ckpt_path):
                self.load(self.ckpt_path)
                resumed = True
            elif self.ctx.is_leader:
                log.info("resume=true but no checkpoint at %s: starting at step 0", self.ckpt_path)
        self._open_outputs()
        self._log_start(resumed)
        restore_signals = self._install_signal_handlers()
        if self.outer is not None:
            self._on_round(self.outer.start(self.step))
        stop = min(c.steps, c.stop_at) if c.stop_at else c.steps
        bar = Progress(stop, c.logger.progress, self.ctx.is_leader, start=self.step)
        t_last, n_last = time.perf_counter(), self.step
        last_val: List[dict] = []
        try:
            while self.step < stop:
                lr = self.scheduler.lr
                t_step = time.perf_counter()
                losses = self.train_step()
                step_s = self._emulate_speed(time.perf_counter() - t_step)
                if self.stop_everywhere:
                    break
                if self.outer is not None:
                    self._on_round(self.outer.after_step(self.step, step_s))
                    if self.stop_everywhere:  # the leader abandoned a round wait to shut down
                        break
                if self.step % c.log_every == 0 or self.step == stop:
                    now = time.perf_counter()
                    sps = (self.step - n_last) * c.batch_size / max(now - t_last, 1e-9)
                    t_last, n_last = now, self.step
                    self._record(
                        {
                            "kind": "step",
                            "step": self.step,
                            "lr": lr,
                            "loss": losses,
                            "samples_per_s": sps,
                            "phase": self.shrink.at(self.step - 1).phase,
                        }
                    )
                    bar.update(self.step, " ".join(f"{k}={v:.3f}" for k, v in losses.items()))
                if c.eval_every and self.step % c.eval_every == 0 and self.step < stop:
                    last_val = self.evaluate("val")
                    self._log_evals(last_val)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            restore_signals()
        if self.outer is not None:
            if self.stop_requested is None:
                self._on_round(self.outer.finish(self.step))
            self.outer.close(leave=True, reason=self.stop_requested or "finished")
            if self.stop_requested is None:
                self.outer.use_global_parameters()
        self.save()
        if self.stop_requested is not None:
            if self.ctx.is_leader:
                log.info("%s: left the run at step %d", self.stop_requested, self.step)
            self._record({"kind": "run", "event": "stopped", "step": self.step, "reason": self.stop_requested})
            if self.metrics is not None:
                self.metrics.close()
            return {"kind": "summary", "step": self.step, "finished": False, "stopped": self.stop_requested}
        finished = self.step >= c.steps
        summary = {
            "kind": "summary",
            "step": self.step,
            "finished": finished,
            "world_size": self.ctx.world_size,
            **self._rank_parity(),
            "grad_allreduce_calls": self.grad_sync.calls,
            "stall_s": self.stall_s,
            "grad_buckets": len(self.grad_sync.buckets) if self.ctx.enabled else 0,
        }
        if finished or c.stop_at:
            val = self.evaluate("val")
            test = self.evaluate("test")
            summary["results"] = self._summarise(val, test)
            if self.ctx.is_leader:
                print(self.results_table(val, test), flush=True)
        self._record(summary)
        if self.ctx.is_leader:
            with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        if self.metrics is not None:
            self.metrics.close()
        return summary

    def _install_signal_handlers(self):
        """SIGTERM / SIGINT: finish the current step, leave the run, checkpoint, exit 0."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, frame):
            self.stop_requested = signal.Signals(signum).name
            if self.ctx.world_size == 1:
                self.stop_everywhere = True

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, h) for sig, h in old.items()]

    def _rank_parity(self) -> dict:
        """Parameter hash of every rank: they must all agree (one optimizer, same gradients)."""
        mine = param_hash(self.model)
        hashes = [mine]
        if self.ctx.enabled:
            hashes = [None] * self.ctx.world_size
            dist.all_gather_object(hashes, mine)
        in_sync = len(set(hashes)) == 1
        if not in_sync and self.ctx.is_leader:
            log.error("ranks hold different parameters: %s", hashes)
        return {"param_hash": mine, "rank_param_hashes": hashes, "ranks_in_sync": in_sync}

    # -- reporting ---------------------------------------------------------------------------
    def _log_start(self, resumed: bool) -> None:
        if not self.ctx.is_leader:
            return
        c, m = self.cfg, self.model
        sw = c.sandwich
        distill = (
            "off (small subnets learn from hard labels)"
            if sw.distill == "none"
            else f"{sw.distill} (T={sw.temperature}, hard-label weight {sw.hard_label_weight})"
        )
        log.info(
            "run_dir %s | %s ranks on %s | %s", self.run_dir, self.ctx.world_size, self.ctx.device, self.data.describe()
        )
        log.info(
            "supernet %s: %s params, %s subnets | sandwich: max + min + %d random, "
            "schedule %s, in-place distillation %s",
            c.model.space,
            human(sum(p.numel() for p in m.parameters())),
            f"{self.space.size():.3g}",
            sw.num_random,
            sw.schedule,
            distill,
        )
        if c.outer.name != "none":
            o = c.outer
            log.info(
                "outer loop %s: H=%d, %d fragment(s), overlap %d, codec %s%s, backend %s, coordinator %s",
                o.name,
                o.sync_every,
                o.fragments,
                o.overlap_steps,
                o.codec,
                " + error feedback" if o.error_feedback else "",
                o.backend,
                c.control.coordinator,
            )
        held = sum(p.numel() for p in m.parameters())
        trained = held if self.slice is None else sum(int(mask.sum()) for mask in self.slice.values())
        if self.top_arch is not None:
            cost = m.cost(self.top_arch)
            log.info(
                "capacity: top arch %s (%s params, %s MACs); trains %s of the %s parameters it holds (%.1f%%)",
                self.space.key(self.top_arch),
                human(cost["params"]),
                human(cost["macs"]),
                human(trained),
                human(held),
                100.0 * trained / held,
            )
        if resumed:
            log.info("resumed from %s at step %d", self.ckpt_path, self.step)
        self._record(
            {
                "kind": "run",
                "event": "resume" if resumed else "start",
                "step": self.step,
                "world_size": self.ctx.world_size,
                "peer_id": c.peer_id,
                "top_arch": self.top_arch,
                "params_held": held,
                "params_trained": trained,
                "slice_fraction": trained / held,
            }
        )

    def _log_evals(self, recs: List[dict]) -> None:
        if self.ctx.is_leader and recs:
            metric = "bpb" if self.model.task == "lm" else "acc"
            log.info("step %d | val %s", self.step, " ".join(f"{r['arch_name']}={r[metric]:.4f}" for r in recs))

    def _summarise(self, val: List[dict], test: List[dict]) -> dict:
        metric = "bpb" if self.model.task == "lm" else "acc"
        out = {}
        for rv in val or test:
            out[rv["arch_name"]] = {"params": rv["params"], "macs": rv["macs"]}
        for split, recs in (("val", val), ("test", test)):
            for r in recs:
                out.setdefault(r["arch_name"], {})[f"{split}_{metric}"] = r[metric]
        if self.model.task == "lm" and "unigram_bpb" in self.data.info:
            out["unigram_bpb"] = self.data.info["unigram_bpb"]
        return out

    def results_table(self, val: List[dict], test: List[dict]) -> str:
        metric = "bpb" if self.model.task == "lm" else "acc"
        by_name: Dict[str, dict] = {}
        for split, recs in (("val", val), ("test", test)):
            for r in recs:
                d = by_name.setdefault(r["arch_name"], {"params": r["params"], "macs": r["macs"]})
                d[split] = r[metric]
        rows = []
        for name, d in by_name.items():
            rows.append(
                [name, human(d["params"]), human(d["macs"]), _pct(d.get("val"), metric), _pct(d.get("test"), metric)]
            )
        has_bn = bool(batch_norms(self.model))
        title = f"subnets{' after BN recalibration' if has_bn else ''} (step {self.step})"
        if metric == "bpb" and "unigram_bpb" in self.data.info:
            title += f"; unigram baseline {self.data.info['unigram_bpb']:.3f} bpb"
        return format_table(["subnet", "params", "MACs", f"val {metric}", f"test {metric}"], rows, title)

    def close(self, clean: bool = False) -> None:
        """Leave the process group; ``clean`` (training finished on this rank) waits for the other ranks."""
        shutdown_distributed(barrier=clean)


def _pct(v, metric):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if metric == "acc" else f"{v:.3f}"


def train(cfg: TrainConfig) -> dict:
    """Run one peer's training from a config; returns the summary record."""
    trainer = Trainer(cfg)
    clean = False
    try:
        summary = trainer.run()
        clean = True
        return summary
    finally:
        trainer.close(clean)
