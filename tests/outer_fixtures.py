"""Helpers for outer-loop integration tests: a coordinator (gloo_store=true) and ``dtrain.sim.model_free_peer`` peers.

Start-up cost. Importing torch costs ~3 s of CPU per process, and these tests
start a dozen processes on two cores. So processes are forked from a
multiprocessing *forkserver* that has imported torch, the sim peer and the
coordinator once (``PRELOAD``); a forked child runs the very same ``main`` as
``python -m dtrain.sim.model_free_peer`` / ``python -m dtrain.cli.coordinator``, in
its own session, with stdout/stderr in files. The forkserver is started once
per pytest session (the ``forkserver`` fixture warms it up) and stopped and
reaped at exit. ``DTRAIN_TEST_SPAWN=1`` starts plain subprocesses instead
(slower; for debugging).

Every process is started through an :class:`OuterCluster`, which remembers it
and kills it by PID at teardown (the ``outer_cluster`` fixture), whatever the
test did. Files are polled with deadlines (``wait_for``), never fixed sleeps.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import pytest

from control_fixtures import read_jsonl, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# coordinator parameters: quick leases, short grace, gloo store on
COORD = dict(lease_timeout_s=1.5, heartbeat_interval_s=0.3, grace_s=0.3, commit_timeout_s=4.0, max_wait_s=2.0,
             gloo_store="true")
ALL_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
PRELOAD = ["torch", "torch.distributed", "grpc", "hydra", "omegaconf", "dtrain.sim.model_free_peer",
           "dtrain.comm.gloo_allreduce", "dtrain.comm.grpc_allreduce", "dtrain.control.server",
           "dtrain.cli.coordinator", "dtrain.cli.app", "dtrain.config"]


# ---------------------------------------------------------------- processes


def _child_main(kind: str, argv: List[str], out_path: str, err_path: str) -> None:
    """Body of a forked child: own session, files for stdio, then the real entry point."""
    os.setsid()
    os.chdir(REPO)
    os.environ.pop("DTRAIN_TOKEN", None)
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


class Child:
    """A process this test started (forked from the forkserver, or a subprocess)."""

    def __init__(self, kind: str, argv: List[str], out_path: str, err_path: str):
        self.kind, self.argv, self.out_path, self.err_path = kind, argv, out_path, err_path
        self._popen = self._proc = None
        if os.environ.get("DTRAIN_TEST_SPAWN") == "1":
            module = "dtrain.sim.model_free_peer" if kind == "peer" else "dtrain.cli.coordinator"
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("DTRAIN_TOKEN", None)
            with open(out_path, "w") as out, open(err_path, "w") as err:
                self._popen = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out, stderr=err,
                                               stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                               start_new_session=True)
            self.pid = self._popen.pid
        else:
            self._proc = _mp_context().Process(target=_child_main, args=(kind, list(argv), out_path, err_path),
                                               daemon=True, name=f"{kind}-{os.path.basename(err_path)}")
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
        raise AssertionError(f"{self.kind} {self.argv[:4]} (pid {self.pid}) did not exit within {timeout:g}s; "
                             f"stderr:\n{self.stderr()[-3000:]}")

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
    def __init__(self, state_dir: str, out_path: str, err_path: str, **params):
        argv = [f"state_dir={state_dir}", "port=0"] + [f"{k}={v}" for k, v in {**COORD, **params}.items()]
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
            return line[len(prefix):].strip() if line.startswith(prefix) and line.endswith("\n") else None

        self.address = wait_for(listening, 30.0, "the coordinator's first stdout line")

    def events(self, kind: Optional[str] = None, **match) -> List[dict]:
        evs = read_jsonl(os.path.join(self.state_dir, "events.jsonl"))
        return [e for e in evs if (kind is None or e["event"] == kind)
                and all(e.get(k) == v for k, v in match.items())]


class Peer(Child):
    def __init__(self, coordinator: str, peer_id: str, rounds: int, out: str, err_path: str, flags: Sequence[str]):
        argv = ["--coordinator", coordinator, "--peer-id", peer_id, "--rounds", str(rounds), "--out", out, *flags]
        super().__init__("peer", argv, os.devnull, err_path)
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
        held = 0
        for r in self.records():
            if r["kind"] == "round":
                held = r["round"] + 1
            elif r["kind"] == "heal":
                held = r["round"]
        return held


class OuterCluster:
    """Starts processes under ``tmp_path`` and kills every one of them by PID in ``cleanup``."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.procs: List[Child] = []
        self.coordinator: Optional[Coordinator] = None

    def start_coordinator(self, **params) -> Coordinator:
        n = sum(isinstance(p, Coordinator) for p in self.procs)
        d = os.path.join(self.dir, f"coord{n}")
        c = Coordinator(d, os.path.join(self.dir, f"coordinator-{n}.out"),
                        os.path.join(self.dir, f"coordinator-{n}.err"), **params)
        self.procs.append(c)
        self.coordinator = c
        return c

    def start_peer(self, peer_id: str, rounds: int, *flags: str) -> Peer:
        assert self.coordinator is not None, "start the coordinator first"
        n = sum(isinstance(p, Peer) and p.peer_id == peer_id for p in self.procs)
        tag = peer_id if n == 0 else f"{peer_id}-{n}"
        p = Peer(self.coordinator.address, peer_id, rounds, os.path.join(self.dir, f"{tag}.jsonl"),
                 os.path.join(self.dir, f"{tag}.err"), flags)
        self.procs.append(p)
        return p

    @property
    def rounds_file(self) -> str:
        """Pass ``--rounds-file`` this path; :meth:`finish` writes the round at which every peer stops."""
        return os.path.join(self.dir, "rounds")

    def finish(self, peers: Sequence["Peer"], more: int = 2, timeout: float = 20.0) -> int:
        """Stop ``peers`` (started with ``--rounds-file``) at one round boundary, ``more`` rounds past the
        furthest of them; asserts they all exit 0 there. Returns that round."""
        stop = max(p.held_round() for p in peers) + more
        tmp = self.rounds_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{stop}\n")
        os.replace(tmp, self.rounds_file)
        codes = self.wait_exit(peers, timeout)
        assert codes == [0] * len(peers), {p.peer_id: (c, p.stderr()[-1500:]) for p, c in zip(peers, codes)}
        for p in peers:
            done = p.records("done")
            assert done and done[-1]["round"] == stop, f"{p.peer_id} stopped at {done}, not round {stop}"
        return stop

    def wait_exit(self, procs: Sequence[Child], timeout: float) -> List[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(max(0.1, deadline - time.monotonic())) for p in procs]

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep cleaning the others
                pass


@pytest.fixture
def outer_cluster(tmp_path):
    c = OuterCluster(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def warm_forkserver() -> None:
    """Start the forkserver (and its preload) now, so that the first test does not pay for it."""
    if os.environ.get("DTRAIN_TEST_SPAWN") != "1":
        from multiprocessing import forkserver

        _mp_context()
        forkserver.ensure_running()


@pytest.fixture(scope="module", autouse=False)
def forkserver():
    warm_forkserver()
    yield


# ---------------------------------------------------------------- checks


def check_parity(peers: Sequence[Peer]) -> Dict[int, str]:
    """Every round committed by several peers has ONE state hash; returns round -> hash of S_{r+1}."""
    seen: Dict[int, str] = {}
    who: Dict[int, str] = {}
    for p in peers:
        for rnd, h in p.hashes().items():
            if seen.setdefault(rnd, h) != h:
                raise AssertionError(f"parity broken at round {rnd}: {p.peer_id} has {h[:12]}, "
                                     f"{who[rnd]} has {seen[rnd][:12]}")
            who.setdefault(rnd, p.peer_id)
    return seen


def check_against_coordinator(coord: Coordinator, peers: Sequence[Peer]) -> Dict[int, dict]:
    """The coordinator's commit events agree with the peers' round records; returns round -> commit event.

    A commit event of round r carries the quorum's reference hash of S_r, i.e. the hash a peer recorded
    after committing round r - 1; its quorum id and members are those of every peer that committed r.
    """
    commits: Dict[int, dict] = {}
    for e in coord.events("commit"):
        assert e["round"] not in commits, f"the coordinator committed round {e['round']} twice: {e}"
        commits[e["round"]] = e
    assert sorted(commits) == list(range(len(commits))), f"committed rounds have gaps: {sorted(commits)}"
    hashes = check_parity(peers)
    for r, e in commits.items():
        if r - 1 in hashes:
            assert e["state_hash"] == hashes[r - 1], f"round {r}: coordinator says S_{r} is " \
                                                     f"{e['state_hash'][:12]}, peers {hashes[r - 1][:12]}"
    for p in peers:
        for r, rec in p.rounds().items():
            e = commits.get(r)
            assert e is not None, f"{p.peer_id} committed round {r}, the coordinator did not"
            assert (rec["quorum_id"], rec["members"]) == (e["quorum_id"], e["members"]), \
                f"{p.peer_id} round {r}: quorum {rec['quorum_id']} {rec['members']}, coordinator " \
                f"{e['quorum_id']} {e['members']}"
            assert p.peer_id in e["members"]
    return commits


def peer_flags(*, codecs: str = "fp32", backends: str = "grpc", fragments: int = 1, numel: int = 4000,
               deadline_s: float = 5.0, extra: Sequence[str] = ()) -> List[str]:
    return ["--codecs", codecs, "--backends", backends, "--fragments", str(fragments), "--numel", str(numel),
            "--deadline-s", str(deadline_s), "--sync-timeout-s", "30", "--join-timeout", "30", *extra]
