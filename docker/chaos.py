"""The chaos service: takes a random peer container down on a seeded schedule and brings it back.

    python docker/chaos.py        # inside the compose project, /var/run/docker.sock mounted

Environment:
    CHAOS_SEED            the schedule's seed (default 0): the same seed gives the same delays and
                          the same choices among the same peers
    CHAOS_EVERY_S         [X,Y]: one action every X..Y seconds (default [30,60])
    CHAOS_START_AFTER_S   first action no earlier than this (default 60: the peers join first); counted
                          from the first commit when CHAOS_STATE_FILE is set (as dtrain-sim's chaos)
    CHAOS_STATE_FILE      the coordinator's state.json (its state volume mounted read-only): the schedule
                          starts once it shows a committed round (default unset: at once)
    CHAOS_DOWN_S          a victim stays down this long, then is started again (default 20)
    CHAOS_ACTION          stop (SIGTERM: the peer leaves and checkpoints, then docker start),
                          kill (SIGKILL, then docker start), pause (freeze, then unpause) (default stop),
                          or a comma-separated list taken in turn: stop,kill stops, kills, stops, ...
    CHAOS_STOP_TIMEOUT_S  stop: seconds before docker sends SIGKILL (default 30)
    CHAOS_MIN_ALIVE       never take the running peers below this (default 1)
    CHAOS_SERVICE         the compose service whose containers are victims (default peer)
    CHAOS_PROJECT         the compose project (default: the project of this container)
    CHAOS_MAX_ACTIONS     stop after this many actions, once every victim is back (default 0: never)
    DOCKER_HOST           unix:///var/run/docker.sock (default)

Every action is one line on stdout. On SIGTERM every container it took down is brought back.
Exit status: 0; 1 the engine could not be used; 2 a bad environment value (one line on stderr).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from docker_api import OK_NOT_MODIFIED, DockerAPI, DockerError, socket_path  # noqa: E402
from envvars import EnvError, integer, interval, number, text  # noqa: E402

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ACTIONS = {"stop": ("stop", "start"), "kill": ("kill", "start"), "pause": ("pause", "unpause")}


@dataclass
class Settings:
    seed: int = 0
    every: Tuple[float, float] = (30.0, 60.0)
    start_after: float = 60.0
    down: float = 20.0
    action: str = "stop"  # one of ACTIONS, or several separated by commas (taken in turn)
    stop_timeout: int = 30
    min_alive: int = 1
    service: str = "peer"
    project: str = ""
    max_actions: int = 0
    state_file: str = ""
    docker_host: str = "unix:///var/run/docker.sock"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        return cls(
            seed=integer(env, "CHAOS_SEED", 0, lo=-(2**63)),
            every=interval(env, "CHAOS_EVERY_S", (30.0, 60.0)),
            start_after=number(env, "CHAOS_START_AFTER_S", 60.0, unit="seconds"),
            down=number(env, "CHAOS_DOWN_S", 20.0, unit="seconds"),
            action=",".join(actions_of(env)),
            stop_timeout=integer(env, "CHAOS_STOP_TIMEOUT_S", 30, lo=0),
            min_alive=integer(env, "CHAOS_MIN_ALIVE", 1, lo=0),
            service=text(env, "CHAOS_SERVICE", "peer"),
            project=text(env, "CHAOS_PROJECT"),
            max_actions=integer(env, "CHAOS_MAX_ACTIONS", 0, lo=0),
            state_file=text(env, "CHAOS_STATE_FILE"),
            docker_host=text(env, "DOCKER_HOST", "unix:///var/run/docker.sock"),
        )

    def verbs(self, index: int) -> Tuple[str, str]:
        """(down, back) of action ``index``: the actions are taken in turn."""
        names = self.action.split(",")
        return ACTIONS[names[index % len(names)]]


def actions_of(env: Mapping[str, str]) -> Tuple[str, ...]:
    raw = env.get("CHAOS_ACTION", "").strip().lower() or "stop"
    names = tuple(n.strip() for n in raw.split(","))
    if not all(n in ACTIONS for n in names):
        raise EnvError(
            f"CHAOS_ACTION={raw!r} is not allowed: choose one of {', '.join(ACTIONS)}, or a comma-separated list "
            "of them taken in turn (stop,kill)"
        )
    return names


# ---------------------------------------------------------------- the seeded schedule


def action_rng(seed: int, index: int) -> random.Random:
    """Action ``index``'s own generator: its delay and its victim do not depend on other actions."""
    return random.Random(f"dtrain-chaos/{seed}/{index}")


def delay(seed: int, index: int, every: Tuple[float, float]) -> float:
    """Seconds between action ``index - 1`` (or the start delay) and action ``index``."""
    return action_rng(seed, index).uniform(*every)


def pick(seed: int, index: int, names: Sequence[str]) -> str:
    """The victim of action ``index`` among the eligible containers (by name, order does not matter)."""
    rng = action_rng(seed, index)
    rng.random()  # the delay's draw
    return rng.choice(sorted(names))


def schedule(seed: int, every: Tuple[float, float], start_after: float, count: int) -> List[float]:
    """Planned times (seconds after start) of the first ``count`` actions."""
    out, t = [], start_after
    for i in range(count):
        t += delay(seed, i, every)
        out.append(t)
    return out


# ---------------------------------------------------------------- the service


def say(t0: float, msg: str) -> None:
    print(f"chaos: [{time.monotonic() - t0:8.1f}s] {msg}", flush=True)


def name_of(c: dict) -> str:
    names = c.get("Names") or [c.get("Id", "?")[:12]]
    return names[0].lstrip("/")


class Chaos:
    def __init__(self, s: Settings, api: DockerAPI):
        self.s, self.api = s, api
        self.down: List[Tuple[float, str, str, str]] = []  # (due, container id, name, the verb that brings it back)
        self.stop = False
        self.t0 = time.monotonic()

    def resolve_project(self) -> str:
        if self.s.project:
            return self.s.project
        me = socket.gethostname()
        try:
            labels = (self.api.inspect(me).get("Config") or {}).get("Labels") or {}
        except DockerError as e:
            raise DockerError(f"cannot find this container's compose project ({e}): set CHAOS_PROJECT") from None
        if PROJECT_LABEL not in labels:
            raise DockerError(f"container {me} has no {PROJECT_LABEL} label: set CHAOS_PROJECT")
        return labels[PROJECT_LABEL]

    def restore(self, cid: str, name: str, back: str) -> None:
        try:
            status = self.api.post(cid, back)
            say(self.t0, f"{back} {name}" + (" (already running)" if status == OK_NOT_MODIFIED else ""))
        except DockerError as e:
            say(self.t0, f"{back} {name} failed: {e}")

    def strike(self, index: int, labels: dict) -> None:
        peers = self.api.containers(labels)
        taken = {x[1] for x in self.down}
        running = [c for c in peers if c.get("State") == "running" and c["Id"] not in taken]
        if len(running) <= self.s.min_alive:
            say(
                self.t0,
                f"skip action {index}: {len(running)} running {self.s.service} container(s), "
                f"CHAOS_MIN_ALIVE={self.s.min_alive}",
            )
            return
        by_name = {name_of(c): c["Id"] for c in running}
        victim = pick(self.s.seed, index, list(by_name))
        verb, back = self.s.verbs(index)
        query = {"t": str(self.s.stop_timeout)} if verb == "stop" else {"signal": "SIGKILL"} if verb == "kill" else {}
        try:
            self.api.post(by_name[victim], verb, **query)
        except DockerError as e:
            say(self.t0, f"{verb} {victim} failed: {e}")
            return
        say(self.t0, f"{verb} {victim} (action {index}); back in {self.s.down:g}s")
        self.down.append((time.monotonic() + self.s.down, by_name[victim], victim, back))

    def committed(self) -> int:
        """The coordinator's committed round in CHAOS_STATE_FILE (0 while there is none)."""
        try:
            with open(self.s.state_file, encoding="utf-8") as f:
                return int(json.load(f).get("committed_round", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0  # not written yet, or caught half-way through an (atomic) replace

    def wait_first_commit(self) -> bool:
        """Until the first commit (True), or until told to stop (False)."""
        say(self.t0, f"waiting for the first commit in {self.s.state_file}")
        while not self.stop:
            c = self.committed()
            if c >= 1:
                say(self.t0, f"committed round {c}: the schedule starts")
                return True
            time.sleep(0.5)
        return False

    def run(self) -> int:
        s = self.s
        self.api.request("GET", "/_ping")  # DockerError now, not at the first action, when unreachable
        project = self.resolve_project()
        labels = {PROJECT_LABEL: project, SERVICE_LABEL: s.service}
        say(
            self.t0,
            f"project {project}, service {s.service}: {s.action} every {s.every[0]:g}-{s.every[1]:g}s "
            f"after {s.start_after:g}s, down {s.down:g}s, seed {s.seed}, min alive {s.min_alive}",
        )
        if s.state_file and not self.wait_first_commit():
            return 0
        index = 0
        due = time.monotonic() + s.start_after + delay(s.seed, 0, s.every)
        while not self.stop:
            now = time.monotonic()
            for item in sorted(x for x in self.down if x[0] <= now):
                self.down.remove(item)
                self.restore(*item[1:])
            done = s.max_actions and index >= s.max_actions
            if done and not self.down:
                break
            if not done and now >= due:
                try:
                    self.strike(index, labels)
                except DockerError as e:
                    say(self.t0, f"action {index} failed: {e}")
                index += 1
                due = time.monotonic() + delay(s.seed, index, s.every)
            nxt = min([due] + [x[0] for x in self.down])
            time.sleep(max(0.01, min(0.5, nxt - time.monotonic())))
        for item in sorted(self.down):
            self.restore(*item[1:])
        self.down.clear()
        return 0


def main(env: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if env is None else env
    try:
        s = Settings.from_env(env)
        path = socket_path(s.docker_host)
    except (EnvError, DockerError) as e:
        print(f"chaos: error: {e}", file=sys.stderr, flush=True)
        return 2
    chaos = Chaos(s, DockerAPI(path))

    def on_signal(signum, frame):
        chaos.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return chaos.run()
    except DockerError as e:
        print(f"chaos: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
