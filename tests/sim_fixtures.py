"""Running ``dtrain-sim`` from tests: every process it started is gone when the test ends, pass or fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import sigint_default

VENV_BIN = os.path.dirname(sys.executable)


def started_pids(run_dir) -> list:
    pids = []
    try:
        with open(os.path.join(run_dir, "events.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") in ("peer_start", "coordinator_start"):
                    pids.append(int(ev["pid"]))
    except FileNotFoundError:
        pass
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_all(proc: subprocess.Popen, run_dir) -> None:
    """SIGKILL the sim's session and the session of every process it started (each has its own)."""
    for pid in [proc.pid] + started_pids(run_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class SimRun:
    def __init__(self, run_dir, args, env=None):
        self.run_dir = str(run_dir)
        self.log = open(os.path.join(os.path.dirname(self.run_dir), os.path.basename(self.run_dir) + ".out"), "w+")
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "dtrain-sim"), f"run_dir={self.run_dir}", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=sigint_default,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def summary(self) -> dict:
        with open(os.path.join(self.run_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)

    def events(self) -> list:
        with open(os.path.join(self.run_dir, "events.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def coordinator_events(self) -> list:
        path = os.path.join(self.run_dir, "coordinator", "events.jsonl")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_for_event(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for ev in self.events():
                    if ev["event"] == kind:
                        return ev
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"no {kind!r} event within {timeout}s:\n{self.output()[-3000:]}")

    def close(self) -> None:
        kill_all(self.proc, self.run_dir)
        self.log.close()


def run_sim(tmp_path, args, timeout: float, name="sim", env=None) -> SimRun:
    run = SimRun(tmp_path / name, args, env)
    try:
        run.wait(timeout)
    except subprocess.TimeoutExpired:
        out = run.output()
        run.close()
        raise AssertionError(f"dtrain-sim did not finish within {timeout}s:\n{out[-4000:]}") from None
    except BaseException:  # e.g. pytest-timeout or Ctrl-C: nothing may outlive the test
        run.close()
        raise
    return run
