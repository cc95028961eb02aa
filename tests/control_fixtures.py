"""Helpers for control-plane integration tests: a real coordinator process and sim_peer processes.

Every process is started through a :class:`Cluster`, which remembers it and
kills it by PID at teardown (the ``cluster`` fixture), whatever the test did.
Timings are tiny so that the whole suite stays fast on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(lease_timeout_s=1.5, heartbeat_interval_s=0.3, grace_s=0.3, commit_timeout_s=3.0, max_wait_s=2.0)


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: str) -> List[dict]:
    """The complete lines of a JSON-lines file (a half-written last line is skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            out.append(json.loads(line))
    return out


def _env() -> Dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DTRAIN_TOKEN", None)
    return env


class Proc:
    """A started process with its stderr in a file."""

    def __init__(self, argv: List[str], err_path: str, stdout=subprocess.DEVNULL):
        self.argv, self.err_path = argv, err_path
        self._err = open(err_path, "w")
        self.popen = subprocess.Popen(argv, stdout=stdout, stderr=self._err, cwd=REPO, env=_env(),
                                      start_new_session=True)
        self.pid = self.popen.pid

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)  # also ends a SIGSTOPped process
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._err.close()


class CoordinatorProc(Proc):
    def __init__(self, state_dir: str, err_path: str, port: int = 0, **params):
        exe = os.path.join(os.path.dirname(sys.executable), "dtrain-coordinator")
        argv = [exe] if os.path.exists(exe) else [sys.executable, "-m", "dtrain.cli.coordinator"]
        argv += [f"state_dir={state_dir}", f"port={port}"] + [f"{k}={v}" for k, v in {**FAST, **params}.items()]
        super().__init__(argv, err_path, stdout=subprocess.PIPE)
        self.state_dir = state_dir
        self.address = self._first_line(30.0)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _first_line(self, timeout: float) -> str:
        box: List[str] = []
        t = threading.Thread(target=lambda: box.append(self.popen.stdout.readline().decode()), daemon=True)
        t.start()
        t.join(timeout)
        line = box[0] if box else ""
        prefix = "coordinator listening on "
        if not line.startswith(prefix):
            self.kill()
            raise AssertionError(f"coordinator did not start (first line {line!r}); stderr:\n{self.stderr()[-2000:]}")
        return line[len(prefix):].strip()

    def state(self) -> dict:
        with open(os.path.join(self.state_dir, "state.json"), encoding="utf-8") as f:
            return json.load(f)

    def committed_round(self) -> int:
        try:
            return int(self.state()["committed_round"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def events(self, kind: Optional[str] = None, **match) -> List[dict]:
        evs = read_jsonl(os.path.join(self.state_dir, "events.jsonl"))
        return [e for e in evs if (kind is None or e["event"] == kind)
                and all(e.get(k) == v for k, v in match.items())]


class PeerProc(Proc):
    def __init__(self, coordinator: str, peer_id: str, rounds: int, out: str, err_path: str, *extra: str,
                 step_s: float = 0.05):
        argv = [sys.executable, "-m", "dtrain.sim.control_peer", "--coordinator", coordinator, "--peer-id", peer_id,
                "--rounds", str(rounds), "--out", out, "--step-s", str(step_s), *extra]
        super().__init__(argv, err_path)
        self.peer_id, self.out = peer_id, out

    def records(self, kind: Optional[str] = None) -> List[dict]:
        return [r for r in read_jsonl(self.out) if kind is None or r["kind"] == kind]

    def hashes(self) -> Dict[int, str]:
        """round r -> hash of S_{r+1} as this peer committed it."""
        return {r["round"]: r["state_hash"] for r in self.records("round")}

    def last_round(self) -> int:
        """The round of the state this peer holds (from its records)."""
        held = 0
        for r in self.records():
            if r["kind"] == "round":
                held = r["round"] + 1
            elif r["kind"] in ("heal", "start"):
                held = r["round"]
        return held


class Cluster:
    """Starts processes under ``tmp_path`` and kills every one of them in ``cleanup``."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.procs: List[Proc] = []
        self.coordinator: Optional[CoordinatorProc] = None

    def start_coordinator(self, port: int = 0, **params) -> CoordinatorProc:
        n = sum(isinstance(p, CoordinatorProc) for p in self.procs)
        err = os.path.join(self.dir, f"coordinator-{n}.err")
        c = CoordinatorProc(os.path.join(self.dir, "coord"), err, port=port, **params)
        self.procs.append(c)
        self.coordinator = c
        return c

    def start_peer(self, peer_id: str, rounds: int, *extra: str, step_s: float = 0.05,
                   out: Optional[str] = None) -> PeerProc:
        assert self.coordinator is not None, "start the coordinator first"
        n = sum(isinstance(p, PeerProc) and p.peer_id == peer_id for p in self.procs)
        tag = peer_id if n == 0 else f"{peer_id}-{n}"
        p = PeerProc(self.coordinator.address, peer_id, rounds, out or os.path.join(self.dir, f"{tag}.jsonl"),
                     os.path.join(self.dir, f"{tag}.err"), *extra, step_s=step_s)
        self.procs.append(p)
        return p

    def peers(self) -> List[PeerProc]:
        return [p for p in self.procs if isinstance(p, PeerProc)]

    def wait_exit(self, procs, timeout: float) -> List[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{p.argv[2:6]} did not exit within {timeout:g}s; stderr:\n"
                                     f"{p.stderr()[-2000:]}") from None
        return codes

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep cleaning the others
                pass


def check_parity(peers: List[PeerProc]) -> Dict[int, str]:
    """Every round committed by several peers has one hash; returns round -> hash."""
    seen: Dict[int, str] = {}
    for p in peers:
        for rnd, h in p.hashes().items():
            assert seen.setdefault(rnd, h) == h, f"parity broken at round {rnd}: {p.peer_id} has {h[:12]}, " \
                                                 f"another peer {seen[rnd][:12]}"
    return seen


def check_chain(peer: PeerProc) -> None:
    """A peer's records chain up: each round starts from the state the previous step left."""
    held: Optional[tuple] = None
    for r in peer.records():
        if r["kind"] in ("start", "heal"):
            held = (r["round"], r["state_hash"])
        elif r["kind"] == "round":
            assert held == (r["round"], r["state_hash_before"]), f"{peer.peer_id}: round {r['round']} did not " \
                                                                 f"start from the state it held {held}"
            held = (r["round"] + 1, r["state_hash"])


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()
