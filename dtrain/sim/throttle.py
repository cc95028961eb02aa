"""Emulated slower hardware from outside a process: stop and continue it in a short duty cycle.

    t = Throttle(proc, speed=0.25, max_s=600)   # proc: a processes.Proc this simulation started
    t.start()
    ...
    t.stop()                                    # always leaves the process continued

Every ``period_s`` (50 ms) the process is sent SIGSTOP for ``(1 - speed)`` of
the period and SIGCONT for the rest, so it runs at about ``speed`` of its
speed, its heartbeats, gRPC calls and timers included: how a busy or smaller
machine looks to the coordinator (an emulation: the process is frozen in
slices, not slowed evenly; a blocking call that would take less than a slice
can take up to one stopped slice longer). The cycle keeps the share of wall
time the process spent stopped at ``1 - speed``: when this thread wakes late
(a loaded machine, other threads holding the GIL) and a running slice
overruns, the next stopped slice is made longer (at most 200 ms).
``stopped_s`` / ``cycles`` say what it did.

Bounded and safe:

- the cycle runs on one daemon thread and ends by itself after ``max_s``
  seconds, when the process exits, or on :meth:`stop`; every way out sends
  SIGCONT, so the process is never left stopped by the throttle;
- only the process a :class:`~dtrain.sim.processes.Proc` holds is signalled:
  its process group (the simulation starts every process as a session
  leader; a process that leads none is signalled alone) and, for a torchrun job, the descendants the agent started in
  sessions of their own, each identified by PID and start time (read again
  from ``/proc`` before every signal, so a reused PID is never signalled).
  Nothing is signalled once ``Proc.popen`` has been reaped.

It does not touch ``Proc.stopped`` (the chaos ``STOP`` signal's state): the
simulation stops a peer's throttle before it signals that peer itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

from .processes import Proc, descendants

PERIOD_S = 0.05
RESCAN_S = 1.0  # how often a torchrun job's workers are looked up again
MAX_OFF_PERIODS = 4  # the longest stopped slice, in periods (200 ms), when late slices are made up


def _start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Throttle:
    """SIGSTOP / SIGCONT duty cycle of one started process: it runs at about ``speed`` of its speed."""

    def __init__(self, proc: Proc, speed: float, max_s: float, period_s: float = PERIOD_S):
        if not 0 < speed < 1:
            raise ValueError(f"throttle speed {speed!r} must be in (0, 1)")
        if max_s <= 0 or period_s <= 0:
            raise ValueError(f"throttle max_s={max_s!r} and period_s={period_s!r} must be > 0")
        self.proc, self.speed, self.max_s, self.period_s = proc, float(speed), float(max_s), float(period_s)
        self.cycles = 0
        self.stopped_s = 0.0  # time the process spent stopped by the throttle
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._halt = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._workers: Dict[int, int] = {}  # descendant pid -> its start time (outside the process group)
        self._own_group: Optional[bool] = None
        self._lock = threading.Lock()  # one signal at a time (the cycle and stop() both send SIGCONT)

    # ------------------------------------------------------------------ control
    def start(self) -> "Throttle":
        if self._thread is not None:
            raise RuntimeError("a Throttle starts once")
        self._thread = threading.Thread(target=self._run, name=f"throttle-{self.proc.name}", daemon=True)
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def elapsed_s(self) -> float:
        """How long the cycle ran (so far)."""
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def stopped_share(self) -> Optional[float]:
        """The share of its running time the process spent stopped (about 1 - speed); None before it ran."""
        elapsed = self.elapsed_s()
        return self.stopped_s / elapsed if elapsed > 0 else None

    def stop(self, timeout: float = 5.0) -> None:
        """End the cycle and leave the process continued (also when the cycle's thread is stuck)."""
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._signal(signal.SIGCONT)

    # ------------------------------------------------------------------ the cycle
    def _run(self) -> None:
        stop_share = 1.0 - self.speed  # of the wall time, the share the process should spend stopped
        on = self.speed * self.period_s
        t_start = self.started_at = time.monotonic()
        deadline = t_start + self.max_s
        rescan = 0.0
        try:
            while not self._halt.is_set() and time.monotonic() < deadline:
                now = time.monotonic()
                if now >= rescan:
                    self._rescan()
                    rescan = now + RESCAN_S
                # the stopped slice that brings the stopped share since the start back to its target: a slice
                # that came late (a busy machine, the GIL) is made up in the next, within MAX_OFF_PERIODS
                due = (stop_share * (now - t_start) - self.stopped_s) / (1.0 - stop_share)
                off = min(max(due, stop_share * self.period_s / 2), MAX_OFF_PERIODS * self.period_s)
                if not self._signal(signal.SIGSTOP):
                    return
                t0 = time.monotonic()
                self._halt.wait(off)
                if not self._signal(signal.SIGCONT):
                    return
                self.stopped_s += time.monotonic() - t0
                self.cycles += 1
                if self._halt.wait(on):
                    return
        finally:
            self._signal(signal.SIGCONT)
            self.ended_at = time.monotonic()

    def _rescan(self) -> None:
        if self.proc.popen.poll() is not None:
            return
        root = self.proc.pid
        try:
            group = root if self._leads_group() else -1
        except (ProcessLookupError, PermissionError):
            return
        workers = {}
        for pid in descendants(root):
            try:
                if os.getpgid(pid) == group:
                    continue  # the process group's signal reaches it
            except (ProcessLookupError, PermissionError):
                continue
            st = _start_time(pid)
            if st is not None:
                workers[pid] = st
        with self._lock:
            self._workers = workers

    def _leads_group(self) -> bool:
        """The process leads its own process group (``spawn`` starts every process in a new session)."""
        if self._own_group is None:
            self._own_group = os.getpgid(self.proc.pid) == self.proc.pid
        return self._own_group

    def _signal(self, sig: int) -> bool:
        """Signal the process group and the known workers; False once the process has exited."""
        with self._lock:
            if self.proc.popen.poll() is not None:
                return False
            try:
                if self._leads_group():
                    os.killpg(self.proc.pid, sig)
                else:
                    os.kill(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return False
            for pid, st in list(self._workers.items()):
                if _start_time(pid) != st:  # gone, or the PID now names another process
                    del self._workers[pid]
                    continue
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    del self._workers[pid]
            return True
