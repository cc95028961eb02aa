"""Latency tables: each unit of a space timed on this machine (``dtrain-latency``).

The table is JSON: ``{"version", "space", "model_config_hash", "device",
"torch", "threads", "batch_size", "repeats", "unit": "ms", "entries": {unit:
median ms}}``. An arch's predicted latency is the sum of its units'
entries (``dtrain.supernet.latency_units``). A table only fits the model config
it was built for (its hash is checked) and the machine it was measured on.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from typing import Callable, Optional

import torch

from ..atomic_io import atomic_write_bytes
from ..supernet import latency_units
from ..supernet.latency_table import TABLE_VERSION, model_config_hash, predict_ms


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
