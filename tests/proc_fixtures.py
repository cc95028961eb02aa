"""Processes for the integration tests: a coordinator and ``dtrain.sim.model_free_peer`` peers.

Start-up cost. Importing torch costs ~1.5-3 s of CPU per process, and these
tests start dozens of processes on two cores. So processes are forked from a
multiprocessing *forkserver* that has imported torch, the model-free peer and
the coordinator once (``PRELOAD``); a forked child runs the very same ``main``
as ``python -m dtrain.sim.model_free_peer`` / ``python -m dtrain.cli.coordinator``,
in its own session, with stdout/stderr in files. The forkserver is started once
per pytest session (the ``forkserver`` fixture warms it up) and stopped and
reaped at exit. ``DTRAIN_TEST_SPAWN=1`` starts plain subprocesses instead
(slower; for debugging).

Environment. A forked child inherits the forkserver's environment (the test
process's when the forkserver started), not the test's current one, so every
child is given its environment explicitly: the test process's, without
``DTRAIN_TOKEN``, with ``PYTHONUNBUFFERED=1``, plus the ``env`` the test passes
(e.g. ``DTRAIN_FAULT_PLUGIN`` and the settings of ``fault_plugin``).

Every process is started through a :class:`Cluster`, which remembers it and
kills it by PID at teardown, whatever the test did. Files are polled with
deadlines (``wait_for``), never fixed sleeps.
"""

from __future__ import annotations

import atexit
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_MODULE = "dtrain.sim.model_free_peer"
COORDINATOR_MODULE = "dtrain.cli.coordinator"
PRELOAD = [
    "torch",
    "torch.distributed",
    "grpc",
    "hydra",
    "omegaconf",
    PEER_MODULE,
    "dtrain.comm.gloo_allreduce",
    "dtrain.comm.grpc_allreduce",
    "dtrain.control.server",
    COORDINATOR_MODULE,
    "dtrain.cli.app",
    "dtrain.config",
]


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


def child_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DTRAIN_TOKEN", None)
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- processes


def _child_main(kind: str, argv: List[str], out_path: str, err_path: str, env: Dict[str, str]) -> None:
    """Body of a forked child: own session, its own environment, files for stdio, then the real entry point."""
    os.setsid()
    os.chdir(REPO)
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    rc = 0
    if kind == "peer":
        from dtrain.sim.model_free_peer import main

        rc = main(argv)
    else:
        from dtrain.cli.coordinator import main

        sys.argv = ["dtrain-coordinator", *argv]
        main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)


_stop_registered = False


def _stop_forkserver() -> None:
    """At exit: stop the forkserver this module started and reap it (no zombie left behind)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private API; without it the server ends at EOF
    if stop is not None:
        try:
            stop()
        except OSError:
            pass


def _mp_context():
    global _stop_registered
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    if not _stop_registered:
        atexit.register(_stop_forkserver)
        _stop_registered = True
    return ctx


def warm_forkserver() -> None:
    """Start the forkserver (and its preload) now, so that the first test does not pay for it."""
    if os.environ.get("DTRAIN_TEST_SPAWN") != "1":
        from multiprocessing import forkserver

        _mp_context()
        forkserver.ensure_running()


@pytest.fixture(scope="module")
def forkserver():
    warm_forkserver()
    yield


class Child:
    """A process this test started (forked from the forkserver, or a subprocess)."""

    def __init__(
        self, kind: str, argv: List[str], out_path: str, err_path: str, env: Optional[Mapping[str, str]] = None
    ):
        self.kind, self.argv, self.out_path, self.err_path = kind, argv, out_path, err_path
        self._popen = self._proc = None
        full_env = child_env(env)
        if os.environ.get("DTRAIN_TEST_SPAWN") == "1":
            module = PEER_MODULE if kind == "peer" else COORDINATOR_MODULE
            with open(out_path, "w") as out, open(err_path, "w") as err:
                self._popen = subprocess.Popen(
                    [sys.executable, "-m", module, *argv],
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    cwd=REPO,
                    env=full_env,
                    start_new_session=True,
                )
            self.pid = self._popen.pid
        else:
            self._proc = _mp_context().Process(
                target=_child_main,
                args=(kind, list(argv), out_path, err_path, full_env),
                daemon=True,
                name=f"{kind}-{os.path.basename(err_path)}",
            )
            self._proc.start()
            self.pid = self._proc.pid

    @property
    def returncode(self) -> Optional[int]:
        if self._popen is not None:
            return self._popen.poll()
        return self._proc.exitcode

    def alive(self) -> bool:
        return self.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); AssertionError after ``timeout``."""
        if self._popen is not None:
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self._proc.join(timeout)
            if self._proc.exitcode is not None:
                return self._proc.exitcode
        raise AssertionError(
            f"{self.kind} {self.argv[:4]} (pid {self.pid}) did not exit within {timeout:g}s; "
            f"stderr:\n{self.stderr()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL (also ends a stopped process) and reap."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            if self._popen is not None:
                self._popen.wait(5)
            else:
                self._proc.join(5)
        except subprocess.TimeoutExpired:
            pass

    def stderr(self) -> str:
        try:
            with open(self.err_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class Coordinator(Child):
    def __init__(self, state_dir: str, out_path: str, err_path: str, port: int = 0, **params):
        argv = [f"state_dir={state_dir}", f"port={port}"] + [f"{k}={v}" for k, v in params.items()]
        super().__init__("coordinator", argv, out_path, err_path)
        self.state_dir = state_dir
        prefix = "coordinator listening on "

        def listening():
            if not self.alive():
                raise AssertionError(f"coordinator exited ({self.returncode}); stderr:\n{self.stderr()[-3000:]}")
            try:
                with open(out_path, encoding="utf-8") as f:
                    line = f.readline()
            except FileNotFoundError:
                return None
            return line[len(prefix) :].strip() if line.startswith(prefix) and line.endswith("\n") else None

        self.address = wait_for(listening, 30.0, "the coordinator's first stdout line")
        self.port = int(self.address.rsplit(":", 1)[1])

    def events(self, kind: Optional[str] = None, **match) -> List[dict]:
        evs = read_jsonl(os.path.join(self.state_dir, "events.jsonl"))
        return [e for e in evs if (kind is None or e["event"] == kind) and all(e.get(k) == v for k, v in match.items())]

    def state(self) -> dict:
        with open(os.path.join(self.state_dir, "state.json"), encoding="utf-8") as f:
            return json.load(f)

    def committed_round(self) -> int:
        try:
            return int(self.state()["committed_round"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0


class Peer(Child):
    """A ``dtrain.sim.model_free_peer`` process and its records."""

    def __init__(
        self,
        coordinator: str,
        peer_id: str,
        rounds: int,
        out: str,
        err_path: str,
        flags: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
    ):
        argv = ["--coordinator", coordinator, "--peer-id", peer_id, "--rounds", str(rounds), "--out", out, *flags]
        super().__init__("peer", argv, os.devnull, err_path, env)
        self.peer_id, self.out = peer_id, out

    def records(self, kind: Optional[str] = None) -> List[dict]:
        return [r for r in read_jsonl(self.out) if kind is None or r["kind"] == kind]

    def rounds(self) -> Dict[int, dict]:
        """round r -> this peer's record of committing it."""
        out: Dict[int, dict] = {}
        for r in self.records("round"):
            assert r["round"] not in out, f"{self.peer_id} committed round {r['round']} twice"
            out[r["round"]] = r
        return out

    def hashes(self) -> Dict[int, str]:
        """round r -> hash of S_{r+1} as this peer committed it."""
        return {r: rec["state_hash"] for r, rec in self.rounds().items()}

    def held_round(self) -> int:
        """The round of the state this peer holds (from its records)."""
        held = 0
        for r in self.records():
            if r["kind"] == "round":
                held = r["round"] + 1
            elif r["kind"] in ("heal", "start"):
                held = r["round"]
        return held


class Cluster:
    """Starts processes under ``tmp_path`` and kills every one of them by PID in ``cleanup``.

    ``coordinator_params``: the coordinator's settings unless a test overrides them."""

    coordinator_params: Dict[str, object] = {}

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.procs: List[Child] = []
        self.coordinator: Optional[Coordinator] = None

    def start_coordinator(self, port: int = 0, **params) -> Coordinator:
        n = sum(isinstance(p, Coordinator) for p in self.procs)
        c = Coordinator(
            os.path.join(self.dir, "coord"),
            os.path.join(self.dir, f"coordinator-{n}.out"),
            os.path.join(self.dir, f"coordinator-{n}.err"),
            port=port,
            **{**self.coordinator_params, **params},
        )
        self.procs.append(c)
        self.coordinator = c
        return c

    def start_peer(
        self, peer_id: str, rounds: int, *flags: str, env: Optional[Mapping[str, str]] = None, out: Optional[str] = None
    ) -> Peer:
        assert self.coordinator is not None, "start the coordinator first"
        n = sum(isinstance(p, Peer) and p.peer_id == peer_id for p in self.procs)
        tag = peer_id if n == 0 else f"{peer_id}-{n}"
        p = Peer(
            self.coordinator.address,
            peer_id,
            rounds,
            out or os.path.join(self.dir, f"{tag}.jsonl"),
            os.path.join(self.dir, f"{tag}.err"),
            flags,
            env,
        )
        self.procs.append(p)
        return p

    def peers(self) -> List[Peer]:
        return [p for p in self.procs if isinstance(p, Peer)]

    def wait_exit(self, procs: Sequence[Child], timeout: float) -> List[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(max(0.1, deadline - time.monotonic())) for p in procs]

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep cleaning the others
                pass


# ---------------------------------------------------------------- checks


def check_parity(peers: Sequence[Peer]) -> Dict[int, str]:
    """Every round committed by several peers has ONE state hash; returns round -> hash of S_{r+1}."""
    seen: Dict[int, str] = {}
    who: Dict[int, str] = {}
    for p in peers:
        for rnd, h in p.hashes().items():
            if seen.setdefault(rnd, h) != h:
                raise AssertionError(
                    f"parity broken at round {rnd}: {p.peer_id} has {h[:12]}, {who[rnd]} has {seen[rnd][:12]}"
                )
            who.setdefault(rnd, p.peer_id)
    return seen


def check_chain(peer: Peer) -> None:
    """A peer's records chain up: each round starts from the state the previous step left."""
    held: Optional[tuple] = None
    for r in peer.records():
        if r["kind"] in ("start", "heal"):
            held = (r["round"], r["state_hash"])
        elif r["kind"] == "round":
            assert held == (r["round"], r["state_hash_before"]), (
                f"{peer.peer_id}: round {r['round']} did not start from the state it held {held}"
            )
            held = (r["round"] + 1, r["state_hash"])
