"""Load a run directory into plain data: per-peer records, simulation events, the coordinator's log.

    run = load_run("runs/sim-x")   # or a dtrain-train run dir
    run.kind                       # "single" (one dtrain-train peer) or "sim" (dtrain-sim)
    run.peers["p0"].records        # metrics.jsonl records, in file order

A **single** run dir holds ``metrics.jsonl`` (and ``config.json``,
``summary.json``); a **sim** run dir holds ``events.jsonl``,
``coordinator/`` and ``peer-<id>/metrics.jsonl``, and ``summary.json`` once
the simulation ended. A directory that is neither, or that does not exist,
is a ``ConfigError`` with one line naming it.

JSON lines: a line a crashed writer left torn is skipped (the last line of a
file, or a torn record followed on the same line by the record a restarted
writer appended: that record is kept). Any other line that is not a JSON
object is a ``ConfigError`` naming the file and the line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import ConfigError


@dataclass
class PeerRun:
    """One peer's outputs."""

    peer: str
    dir: str
    records: List[dict]
    config: dict = field(default_factory=dict)  # config.json ({} when absent)
    summary: dict = field(default_factory=dict)  # summary.json ({} when absent)

    def of(self, kind: str) -> List[dict]:
        return [r for r in self.records if r.get("kind") == kind]


@dataclass
class Run:
    """A whole run directory."""

    kind: str  # single | sim
    dir: str
    peers: Dict[str, PeerRun]
    events: List[dict] = field(default_factory=list)  # sim: events.jsonl
    coordinator: List[dict] = field(default_factory=list)  # sim: coordinator/events.jsonl
    coordinator_state: dict = field(default_factory=dict)  # sim: coordinator/state.json
    summary: dict = field(default_factory=dict)  # sim: summary.json of the simulation
    torn_lines: List[str] = field(default_factory=list)  # "file:line" of skipped torn lines

    def records(self, kind: str) -> List[Tuple[str, dict]]:
        """(peer, record) of one kind across every peer."""
        return [(p, r) for p, pr in self.peers.items() for r in pr.of(kind)]

    def t0(self) -> Optional[float]:
        """Unix time the run started: the simulation's start, else the earliest record."""
        for ev in self.events:
            if ev.get("event") == "sim_start" and isinstance(ev.get("time"), (int, float)):
                return float(ev["time"])
        times = [r["time"] for pr in self.peers.values() for r in pr.records if isinstance(r.get("time"), (int, float))]
        times += [e["time"] for e in self.events + self.coordinator if isinstance(e.get("time"), (int, float))]
        return min(times) if times else None


def read_jsonl(path: str, torn: Optional[List[str]] = None) -> List[dict]:
    """JSON objects of a JSON-lines file; torn lines of a crashed writer skipped (see module doc)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    out: List[dict] = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        rec, ok = _parse(line)
        if ok:
            out.append(rec)
            continue
        last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1 :])
        rest = _appended_record(line)
        if last or rest is not None:
            if torn is not None:
                torn.append(f"{path}:{i + 1}")
            if rest is not None:
                out.append(rest)
            continue
        raise ConfigError(
            f"{path} line {i + 1} is not a JSON object ({_snippet(line)}): the file is corrupt; fix or remove that line"
        )
    return out


def _parse(line: str) -> Tuple[Optional[dict], bool]:
    try:
        rec = json.loads(line)
    except ValueError:
        return None, False
    return (rec, True) if isinstance(rec, dict) else (None, False)


def _appended_record(line: str) -> Optional[dict]:
    """A torn record followed by a whole one (a killed writer, then its restart appending)."""
    start = line.find("{", 1)
    while start > 0:
        rec, ok = _parse(line[start:])
        if ok and ("kind" in rec or "event" in rec):
            return rec
        start = line.find("{", start + 1)
    return None


def _snippet(line: str) -> str:
    return repr(line[:40] + ("..." if len(line) > 40 else ""))


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _peer(peer: str, d: str, torn: List[str]) -> PeerRun:
    return PeerRun(
        peer,
        d,
        read_jsonl(os.path.join(d, "metrics.jsonl"), torn),
        _read_json(os.path.join(d, "config.json")),
        _read_json(os.path.join(d, "summary.json")),
    )


def load_run(run_dir: str) -> Run:
    """Read ``run_dir``; ConfigError (one line) when it is missing or not a run directory."""
    shown = repr(run_dir)
    if not run_dir:
        raise ConfigError("run_dir is empty: give a dtrain-train or dtrain-sim run directory (run_dir=...)")
    if not os.path.exists(run_dir):
        raise ConfigError(f"run_dir={shown} does not exist")
    if not os.path.isdir(run_dir):
        raise ConfigError(
            f"run_dir={shown} is a file, not a directory: give the run directory "
            "(the one holding metrics.jsonl or events.jsonl)"
        )
    d = os.path.abspath(run_dir)
    torn: List[str] = []
    peer_dirs = sorted(
        x for x in os.listdir(d) if x.startswith("peer-") and os.path.isfile(os.path.join(d, x, "metrics.jsonl"))
    )
    if os.path.isfile(os.path.join(d, "events.jsonl")) or peer_dirs:
        if not peer_dirs:
            raise ConfigError(
                f"run_dir={shown} is a dtrain-sim run without any peer-*/metrics.jsonl: no peer has written metrics yet"
            )
        peers = {x[5:]: _peer(x[5:], os.path.join(d, x), torn) for x in peer_dirs}
        coord = os.path.join(d, "coordinator")
        events = (
            read_jsonl(os.path.join(d, "events.jsonl"), torn) if os.path.isfile(os.path.join(d, "events.jsonl")) else []
        )
        clog = (
            read_jsonl(os.path.join(coord, "events.jsonl"), torn)
            if os.path.isfile(os.path.join(coord, "events.jsonl"))
            else []
        )
        return Run(
            "sim",
            d,
            peers,
            events,
            clog,
            _read_json(os.path.join(coord, "state.json")),
            _read_json(os.path.join(d, "summary.json")),
            torn,
        )
    if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
        raise ConfigError(
            f"run_dir={shown} holds no metrics.jsonl, events.jsonl or peer-*/metrics.jsonl: "
            "not a dtrain-train or dtrain-sim run directory"
        )
    pr = _peer("", d, torn)
    pr.peer = str(
        pr.config.get("peer_id")
        or next((r["peer_id"] for r in pr.records if r.get("kind") == "run" and r.get("peer_id")), "peer")
    )
    if not pr.records:
        raise ConfigError(f"run_dir={shown}: metrics.jsonl holds no records yet")
    return Run("single", d, {pr.peer: pr}, torn_lines=torn)
