"""Latency tables: each unit of a space timed on this machine (``dtrain-latency``).

The table is JSON: ``{"version", "space", "model_config_hash", "device",
"torch", "threads", "batch_size", "repeats", "unit": "ms", "entries": {unit:
median ms}}``. An arch's predicted latency is the sum of its units'
entries (``dtrain.supernet.latency_units``). A table only fits the model config
it was built for (its hash is checked) and the machine it was measured on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import statistics
import time
from typing import Callable, Optional

import torch

from ..atomic_io import atomic_write_bytes
from ..config import ConfigError
from ..supernet import latency_units

TABLE_VERSION = 1


def model_config_hash(model_cfg) -> str:
    blob = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


@torch.no_grad()
def time_module(module, x, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``module(x)`` in milliseconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        module(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_table(
    model,
    model_cfg,
    device: torch.device,
    batch_size: int,
    warmup: int,
    repeats: int,
    progress: Optional[Callable[[str, float], None]] = None,
) -> dict:
    model.to(device).eval()
    entries = {}
    for name, module, x in latency_units.modules(model, batch_size):
        module.to(device).eval()
        entries[name] = round(time_module(module, x.to(device), device, warmup, repeats), 6)
        if progress is not None:
            progress(name, entries[name])
    return {
        "version": TABLE_VERSION,
        "space": model.space.name,
        "model_config_hash": model_config_hash(model_cfg),
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "repeats": repeats,
        "unit": "ms",
        "entries": entries,
    }


def predict_ms(model, entries: dict, arch: dict, where: str = "the latency table") -> float:
    """The table's latency of ``arch``: the sum of its units' entries."""
    total = 0.0
    for unit in latency_units.units(model, arch):
        if unit not in entries:
            raise ConfigError(f"{where} has no entry {unit!r}: rebuild it with dtrain-latency")
        total += entries[unit]
    return total


def check_table(model, table: dict, device: torch.device, n: int, warmup: int, repeats: int, seed: int = 0) -> list:
    """Time ``n`` whole extracted subnets (largest, smallest, then seeded random ones) and set
    each beside the table's prediction: how far the sum of units is from the real thing
    (the sum leaves out what glues units together: residual adds, memory format changes)."""
    space = model.space
    archs = [("largest", space.max()), ("smallest", space.min())]
    rng = random.Random(seed)
    archs += [(f"random{i}", space.sample(rng)) for i in range(max(0, n - 2))]
    rows = []
    for name, arch in archs[:n]:
        net = model.extract(arch).to(device).eval()
        x = latency_units.example_input(model, arch, table["batch_size"], device)
        measured = time_module(net, x, device, warmup, repeats)
        predicted = predict_ms(model, table["entries"], arch)
        rows.append(
            {
                "name": name,
                "arch": arch,
                "predicted_ms": round(predicted, 6),
                "measured_ms": round(measured, 6),
                "ratio": round(predicted / measured, 4),
            }
        )
    return rows


def save_table(path: str, table: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())


class LatencyTable:
    """A loaded table that predicts the latency of archs of one model config."""

    def __init__(self, path: str, model, model_cfg):
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
        except (OSError, ValueError) as ex:
            raise ConfigError(f"latency table {path!r} cannot be read ({ex}): build one with dtrain-latency") from ex
        if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or "entries" not in table:
            raise ConfigError(f"latency table {path!r} is not a dtrain-latency table (version {TABLE_VERSION})")
        if table.get("model_config_hash") != model_config_hash(model_cfg):
            raise ConfigError(
                f"latency table {path!r} was built for another model config: rebuild it with "
                f"dtrain-latency checkpoint=... out={path}"
            )
        self.path, self.model, self.table = path, model, table
        self.entries = table["entries"]

    def predict(self, arch: dict) -> float:
        return predict_ms(self.model, self.entries, arch, where=f"latency table {self.path!r}")
