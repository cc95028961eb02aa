"""Scoring candidate subnets: BN recalibration, then one split, spread over ranks.

Each candidate is evaluated whole by one rank (candidate j on rank j mod W):
recalibrate its BN statistics on the full cached calibration set, evaluate
the whole split in a fixed order. The numbers are then summed across ranks
(every other rank contributes zeros), so every rank holds every result, the
results do not depend on the number of ranks, and every rank runs the same
search. The score is the accuracy for classification and minus the bits per
byte for language models (higher is better either way).
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from ..train.evaluate import evaluate_arch

FIELDS = ("acc", "loss", "bpb")


class SubnetScorer:
    def __init__(self, model, split, calib: List[torch.Tensor], batch_size: int, device, rank: int = 0, world: int = 1):
        self.model, self.split, self.calib = model, split, calib
        self.batch_size, self.device = batch_size, device
        self.rank, self.world = rank, world
        self.task = model.task
        self._cache: dict = {}
        self.evaluations = 0

    def _one(self, arch: dict) -> List[float]:
        res = evaluate_arch(
            self.model,
            arch,
            self.split,
            self.calib,
            self.batch_size,
            self.device,
            self.task,
            rank=0,
            world=1,
            keep_bn=True,
        )
        return [float(res.get(k, 0.0)) for k in FIELDS]

    def __call__(self, archs: List[dict]) -> List[dict]:
        keys = [self.model.space.key(a) for a in archs]
        todo = [j for j, k in enumerate(keys) if k not in self._cache]
        table = torch.zeros(len(todo), len(FIELDS), dtype=torch.float64)
        for row, j in enumerate(todo):
            if row % self.world == self.rank:
                table[row] = torch.tensor(self._one(archs[j]), dtype=torch.float64)
        if self.world > 1 and len(todo):
            t = table.to(self.device)
            dist.all_reduce(t)
            table = t.cpu()
        for row, j in enumerate(todo):
            vals = dict(zip(FIELDS, table[row].tolist()))
            out = {"acc": vals["acc"], "loss": vals["loss"]}
            if self.task == "lm":
                out["bpb"] = vals["bpb"]
            out["score"] = -vals["bpb"] if self.task == "lm" else vals["acc"]
            self._cache[keys[j]] = out
        self.evaluations += len(todo)
        return [dict(self._cache[k]) for k in keys]
