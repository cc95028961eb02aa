"""Reading a latency table (built by ``dtrain-latency``): an arch's predicted latency on one machine.

The table is JSON: ``{"version", "space", "model_config_hash", "device",
"torch", "threads", "batch_size", "repeats", "unit": "ms", "entries": {unit:
median ms}}``. An arch's predicted latency is the sum of its units' entries
(``latency_units``). A table only fits the model config it was built for (its
hash is checked) and the machine it was measured on. Building a table is
``dtrain.search.latency``'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from ..config import ConfigError
from . import latency_units

TABLE_VERSION = 1


def model_config_hash(model_cfg) -> str:
    blob = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def predict_ms(model, entries: dict, arch: dict, where: str = "the latency table") -> float:
    """The table's latency of ``arch``: the sum of its units' entries."""
    total = 0.0
    for unit in latency_units.units(model, arch):
        if unit not in entries:
            raise ConfigError(f"{where} has no entry {unit!r}: rebuild it with dtrain-latency")
        total += entries[unit]
    return total


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
