"""Metrics JSONL: one JSON object per line, appended and flushed per record.

Record kinds written by training: ``step``, ``eval``, ``run`` (start / end).
Every record gets a wall-clock ``time``. Non-finite floats are written as
null so every line stays valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator, List


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsWriter:
    def __init__(self, path: str, sinks: List = ()):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        rec = {**_clean(record), "time": round(time.time(), 3)}
        self._f.write(json.dumps(rec, sort_keys=False) + "\n")
        self._f.flush()
        for s in self.sinks:
            s.log(rec)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        for s in self.sinks:
            s.close()


def read_metrics(path: str) -> Iterator[dict]:
    """Records of a metrics file; a torn last line (crash mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
