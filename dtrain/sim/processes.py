"""The processes of a simulation: a coordinator and peers, each in its own session, stopped on exit.

Every process is started with ``start_new_session=True`` so that a signal to
its process group reaches a torchrun job's workers too, and so that Ctrl-C in
the terminal reaches only ``dtrain-sim``, which then stops what it started (TERM,
then KILL after a grace period). Output goes to ``<name>.log`` in the run dir.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def venv_script(name: str) -> str:
    """A console script beside this interpreter (the venv's bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    log_offset: int = 0  # where this process's output starts in its (appended) log
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False  # SIGSTOPped
    tree: set = field(default_factory=set)  # descendants seen so far
    term_children: bool = False  # SIGTERM / SIGINT go to its children (a torchrun agent)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal its whole tree: torchrun puts its workers in sessions of their own."""
        if self.popen.poll() is not None:
            return
        kids = descendants(self.popen.pid)
        if self.term_children and kids and sig in (signal.SIGTERM, signal.SIGINT):
            # torchrun: the workers leave gracefully and the agent then exits 0; a TERMed agent
            # would instead kill its workers and fail
            targets = kids
        else:
            targets = [self.popen.pid] + kids
        for pid in targets:
            try:
                os.killpg(pid, sig) if pid == self.popen.pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def stop(self, grace_s: float = 10.0) -> Optional[int]:
        """TERM (after CONT, if stopped), wait, then KILL; returns the exit status."""
        if self.popen.poll() is None:
            if self.stopped:
                self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        self.kill_group()
        return self.popen.returncode

    def kill_group(self) -> None:
        """Make sure nothing of it survives: its session, and the workers a torchrun agent left behind."""
        for pid in self.tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def remember_tree(self) -> None:
        """Note its descendants while they are attached (a killed parent orphans them)."""
        self.tree |= set(descendants(self.popen.pid))


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def spawn(
    name: str, cmd: List[str], log_dir: str, env: Optional[Dict[str, str]] = None, term_children: bool = False
) -> Proc:
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    out = open(log_path, "ab")
    offset = out.tell()
    try:
        p = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    finally:
        out.close()
    return Proc(name, p, log_path, log_offset=offset, term_children=term_children)


def wait_for_line(path: str, prefix: str, proc: Proc, timeout: float) -> str:
    """The first line of ``path`` starting with ``prefix`` (the process writes it); RuntimeError if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(proc.log_offset)
                for raw in f:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith(prefix):
                        return line.strip()
        except FileNotFoundError:
            pass
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} before saying {prefix!r}; see {path}"
            )
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not say {prefix!r} within {timeout:g}s; see {path}")
