"""The coordinator's state dir: durable round state and the event log.

- ``state.json``: committed round, its state hash, the quorum-id counter, the
  schema hash and the latest commits (enough to answer a commit asked again
  after a restart; the full history is in ``events.jsonl``); small, and
  replaced atomically on every change
  (before any answer that depends on it leaves the coordinator).
- ``events.jsonl``: one JSON object per membership change, quorum, commit and
  retry, with wall-clock ``time``; appended and flushed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from ..atomic_io import atomic_write_bytes


class StateStore:
    def __init__(self, state_dir: str):
        self.dir = os.path.abspath(state_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.state_path = os.path.join(self.dir, "state.json")
        self.events_path = os.path.join(self.dir, "events.jsonl")
        self._events = open(self.events_path, "a", encoding="utf-8")

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path, encoding="utf-8") as f:
            return json.load(f)

    def save(self, snapshot: dict) -> None:
        atomic_write_bytes(self.state_path, json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode())

    def append_event(self, event: dict) -> dict:
        rec = {"time": round(time.time(), 3), **event}
        self._events.write(json.dumps(rec) + "\n")
        self._events.flush()
        return rec

    def close(self) -> None:
        self._events.close()
