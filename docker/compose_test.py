"""``make compose-test``: the docker-compose simulation through a real Docker engine, checked end to end.

    python docker/compose_test.py [--rounds 60] [--peers 4] [--torch torch==2.13.0] [--keep-logs DIR]

1. An engine must answer (``docker version``); without one: one line ``compose-test: skipped: ...``, exit 0.
2. A base image: ``$BASE_IMAGE`` when set; else python:3.11-slim when it is there or can be pulled; else
   one made from Debian packages by docker/base-image.sh (``dtrain-base:bookworm``, kept for later runs).
3. The CPU torch wheel into the wheelhouse docker/wheels (from pip's own find-links when it has it, else
   the pytorch CPU index), then ``docker build`` (BuildKit) with the machine's CA bundle as the build
   secret ``ca_bundle``.
4. ``up`` with the certificates (TLS + per-peer identities), the coordinator, ``--scale peer=N`` and chaos; every
   healthcheck; from the first commit chaos stops and kills peers (in turn) and starts them again on a
   seeded schedule; half-way, after chaos, the coordinator's container is stopped and started again.
5. Once the target rounds are committed, chaos is done, the coordinator is back and every victim took
   part in a round after its resume, every peer is stopped (it leaves the run and checkpoints), as
   dtrain-sim ends a run. Then parity on every round from the peers' run dirs (the ``peer-runs``
   volume) and the coordinator's state (``coordinator-state``), judged by dtrain-sim's judge
   (dtrain/sim/summary.py), plus what only the engine shows: every victim resumed from its volume and
   took part in a later round, the coordinator's committed round never went back. A summary like
   dtrain-sim's, with the times and bytes.
6. ``down -v`` always (failure, Ctrl-C, SIGTERM), then a check that no container, network or volume of
   the project is left.

Works with ``docker compose`` (v2) and ``docker-compose`` (1.29). Environment: BASE_IMAGE, DTRAIN_IMAGE
(default dtrain:compose-test), COMPOSE_TEST_CA_BUNDLE (default: PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE
or /etc/ssl/certs/ca-certificates.crt). Exit status: 0 passed or skipped; 1 failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
COMPOSE_FILE = os.path.join(HERE, "docker-compose.yml")
WHEELS = os.path.join(HERE, "wheels")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
DEFAULT_BASE = "python:3.11-slim"
DEBIAN_BASE = "dtrain-base:bookworm"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")

# the tiny supernet of the test suite (tests/conftest.py FAST_MBV3) and dtrain-sim's fast peer settings
TINY_MODEL = [
    "model.stem_channels=8",
    "model.stages=[{channels:8,stride:1,act:relu,se:false},{channels:16,stride:2,act:hswish,se:true}]",
    "model.final_expand=2",
    "model.feature_dim=32",
    "model.depths=[1,2]",
    "model.kernel_sizes=[3,5]",
    "model.expand_ratios=[2,3]",
    "model.resolutions=[8,12]",
]


AFTER_RESTART = 5  # rounds the restarted coordinator must commit before the run may end


class Failed(RuntimeError):
    """The compose test failed; the message is one line."""


def say(msg: str) -> None:
    print(f"compose-test: {msg}", flush=True)


# ---------------------------------------------------------------- the engine and its tools


def run(cmd: Sequence[str], timeout: float = 60, env=None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, **kw
        )
    except subprocess.TimeoutExpired:
        raise Failed(f"{' '.join(cmd[:4])} ... did not finish in {timeout:g} s") from None
    except FileNotFoundError:
        raise Failed(f"{cmd[0]}: not found") from None
    if check and p.returncode != 0:
        why = " ".join((p.stderr or p.stdout).split())[-600:]
        raise Failed(f"{' '.join(cmd[:5])} failed (exit {p.returncode}): {why}")
    return p


def docker_clis() -> List[str]:
    """Every ``docker`` on PATH (a host may have two clients), first one first."""
    out, seen = [], set()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d or ".", "docker")
        if os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(p)
    return out


def engine_answers(docker: str) -> str:
    """The engine's version, or '' when it does not answer."""
    try:
        p = run([docker, "version", "--format", "{{.Server.Version}}"], timeout=20)
    except Failed:
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


def compose_command(clis: Sequence[str]) -> List[str]:
    for docker in clis:
        if run([docker, "compose", "version"], timeout=20).returncode == 0:
            return [docker, "compose"]
    exe = shutil.which("docker-compose")
    if exe and run([exe, "version"], timeout=20).returncode == 0:
        return [exe]
    raise Failed("neither `docker compose` (v2) nor `docker-compose` (1.29) is installed")


def buildkit_cli(clis: Sequence[str]) -> str:
    """A docker client that builds with BuildKit: one with buildx, or one older than 23 (built-in BuildKit)."""
    for docker in clis:
        if run([docker, "buildx", "version"], timeout=20).returncode == 0:
            return docker
        v = run([docker, "version", "--format", "{{.Client.Version}}"], timeout=20).stdout.strip()
        try:
            if (18, 9) <= tuple(int(x) for x in v.split(".")[:2]) < (23, 0):
                return docker
        except ValueError:
            continue
    raise Failed(
        "no docker client here builds with BuildKit (docker/Dockerfile needs it): install the buildx plugin "
        "(docker-buildx), or use a client from 18.09 to 22.x with DOCKER_BUILDKIT=1"
    )


def ca_bundle() -> str:
    for name in ("COMPOSE_TEST_CA_BUNDLE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.path.isfile(os.environ.get(name, "")):
            return os.environ[name]
    return next((p for p in CA_BUNDLES if os.path.isfile(p)), "")


# ---------------------------------------------------------------- base image, wheelhouse, build


def base_image(docker: str) -> str:
    want = os.environ.get("BASE_IMAGE", "")
    if want:
        if run([docker, "image", "inspect", want], timeout=30).returncode != 0:
            run([docker, "pull", want], timeout=600, check=True)
        say(f"base image {want} (BASE_IMAGE)")
        return want
    if run([docker, "image", "inspect", DEFAULT_BASE], timeout=30).returncode == 0:
        say(f"base image {DEFAULT_BASE} (already here)")
        return DEFAULT_BASE
    if run([docker, "image", "inspect", DEBIAN_BASE], timeout=30).returncode == 0:
        say(f"base image {DEBIAN_BASE} (made earlier from Debian packages; `docker rmi {DEBIAN_BASE}` to remake)")
        return DEBIAN_BASE
    try:
        pulled = run([docker, "pull", DEFAULT_BASE], timeout=120)
    except Failed:
        pulled = None
    if pulled is not None and pulled.returncode == 0:
        say(f"base image {DEFAULT_BASE} (pulled)")
        return DEFAULT_BASE
    say(f"no registry reachable ({DEFAULT_BASE} cannot be pulled): making {DEBIAN_BASE} from Debian packages")
    t0 = time.monotonic()
    p = subprocess.run(
        [os.path.join(HERE, "base-image.sh"), DEBIAN_BASE], env={**os.environ, "DOCKER": docker}, timeout=900
    )
    if p.returncode != 0:
        raise Failed(
            f"docker/base-image.sh failed (exit {p.returncode}); or set BASE_IMAGE to an image with Python 3.11"
        )
    say(f"base image {DEBIAN_BASE} made in {time.monotonic() - t0:.0f} s")
    return DEBIAN_BASE


def torch_wheel(torch_spec: str) -> None:
    """The CPU torch wheel into the wheelhouse, unless one is there (never the default index's CUDA build)."""
    have = [f for f in os.listdir(WHEELS) if f.startswith("torch-") and f.endswith(".whl")]
    if have:
        say(f"wheelhouse: {', '.join(sorted(have))}")
        return
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11"]
    base += ["--disable-pip-version-check", "-d", WHEELS, torch_spec]
    for extra, where in ((["--no-index"], "pip's find-links"), (["--index-url", TORCH_CPU_INDEX], TORCH_CPU_INDEX)):
        try:
            p = run(base + extra, timeout=900)
        except Failed:
            continue
        have = [f for f in os.listdir(WHEELS) if f.startswith("torch-") and f.endswith(".whl")]
        if p.returncode == 0 and have:
            say(f"wheelhouse: {have[0]} (from {where})")
            return
    say("wheelhouse: no torch wheel could be fetched here: the build downloads it from " + TORCH_CPU_INDEX)


def build(docker: str, image: str, base: str, torch_spec: str, log_path: str) -> float:
    cmd = [docker, "build", "-f", os.path.join(HERE, "Dockerfile"), "-t", image, "--progress=plain"]
    cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    if "==" in torch_spec:
        cmd += ["--build-arg", f"TORCH_VERSION={torch_spec.split('==', 1)[1]}"]
    ca = ca_bundle()
    if ca:
        cmd += ["--secret", f"id=ca_bundle,src={ca}"]
    cmd.append(REPO)
    say(f"docker build -t {image} (base {base}{', CA bundle ' + ca if ca else ''}; log {log_path})")
    before = run([docker, "image", "inspect", "-f", "{{.Id}}", image], timeout=30).stdout.strip()
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        p = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=1800
        )
    took = time.monotonic() - t0
    if p.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        print(tail, flush=True)
        raise Failed(f"docker build failed (exit {p.returncode}); the whole log is {log_path}")
    after = run([docker, "image", "inspect", "-f", "{{.Id}}", image], timeout=30).stdout.strip()
    if before and before != after:  # the previous build, now untagged: its own layers go (not the shared ones)
        run([docker, "rmi", before], timeout=300)
    return took


# ---------------------------------------------------------------- the compose project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Plan:
    peers: int = 4
    rounds: int = 60  # at least these; the run goes on until chaos, the restart and the rejoins are done
    max_rounds: int = 1000  # the peers' step budget (steps = max_rounds x H)
    inner_steps: int = 4
    chaos_actions: int = 4
    chaos_seed: int = 12  # with 4 peers: stop peer 4, kill peer 2, stop peer 1, kill peer 3 (each once)
    chaos_every: str = "[4,6]"  # longer than a victim is down: one peer down at a time (CHAOS_MIN_ALIVE)
    chaos_down_s: float = 3.0
    healthy_timeout_s: float = 600.0  # vfs on a busy 2-core machine: 4 minutes seen
    run_timeout_s: float = 900.0

    def peer_args(self) -> str:
        return " ".join(
            TINY_MODEL
            + [
                "batch_size=16",
                "eval_batch_size=128",
                "calib_batches=2",
                "calib_batch_size=16",
                "log_every=1",
                "logger.progress=off",
                "threads=1",
                f"steps={self.max_rounds * self.inner_steps}",
                f"outer.sync_every={self.inner_steps}",
                "eval_every=0",
                f"checkpoint_every={self.inner_steps}",  # every round: a killed peer resumes from its volume
                "eval_archs=[max]",
            ]
        )

    def env(self, image: str) -> Dict[str, str]:
        return {
            "DTRAIN_IMAGE": image,
            "PEERS": str(self.peers),
            "DTRAIN_MIN_PEERS": "2",
            "DTRAIN_TLS": "on",
            "DTRAIN_SECRET": "",  # the certs service makes a random cluster secret (per-peer identities)
            "DTRAIN_COORDINATOR_PORT": str(free_port()),
            "DTRAIN_COORDINATOR_ARGS": "lease_timeout_s=5 heartbeat_interval_s=1",
            "DTRAIN_PEER_ARGS": self.peer_args(),
            "NPROC_PER_NODE": "1",
            "NETEM": "on",
            "NETEM_DELAY_MS": "40",
            "NETEM_JITTER_MS": "5",
            "NETEM_LOSS_PCT": "0",
            "NETEM_RATE_MBIT": "100",
            "CHAOS_SEED": str(self.chaos_seed),
            "CHAOS_EVERY_S": self.chaos_every,
            "CHAOS_START_AFTER_S": "1",
            "CHAOS_DOWN_S": f"{self.chaos_down_s:g}",
            "CHAOS_ACTION": "stop,kill",
            "CHAOS_MAX_ACTIONS": str(self.chaos_actions),
            "CHAOS_MIN_ALIVE": "2",
            "CHAOS_STOP_TIMEOUT_S": "20",
        }


@dataclass
class Box:
    """One container, as `docker inspect` shows it."""

    id: str
    name: str
    service: str
    hostname: str
    status: str
    exit_code: int
    health: str
    restarts: int

    @classmethod
    def of(cls, d: dict) -> "Box":
        st = d.get("State") or {}
        cfg = d.get("Config") or {}
        return cls(
            id=d["Id"],
            name=d.get("Name", "").lstrip("/"),
            service=(cfg.get("Labels") or {}).get(SERVICE_LABEL, ""),
            hostname=cfg.get("Hostname", ""),
            status=st.get("Status", ""),
            exit_code=int(st.get("ExitCode", 0)),
            health=(st.get("Health") or {}).get("Status", ""),
            restarts=int(d.get("RestartCount", 0)),
        )


@dataclass
class Project:
    docker: str
    compose: List[str]
    name: str
    env: Dict[str, str]
    work: str
    events: List[dict] = field(default_factory=list)  # sim-like events.jsonl (faults, restarts)
    peer_ids: Dict[str, str] = field(default_factory=dict)  # container name -> the peer id it claimed (collect)

    def compose_run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.compose, "-p", self.name, "-f", COMPOSE_FILE, *args]
        # docker-compose 1.29 gives up on an engine call after 60 s; with the vfs storage driver creating
        # (copying) or removing a container on a busy host takes longer
        env = {"COMPOSE_HTTP_TIMEOUT": "900", "DOCKER_CLIENT_TIMEOUT": "900", **os.environ, **self.env}
        return run(cmd, timeout=timeout, env=env, check=check, cwd=REPO)

    def boxes(self, service: str = "") -> List[Box]:
        p = run([self.docker, "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={self.name}"], timeout=30, check=True)
        ids = p.stdout.split()
        if not ids:
            return []
        p = run([self.docker, "inspect", *ids], timeout=30)
        if p.returncode != 0:  # one went away between the two calls: ask again
            return self.boxes(service)
        out = [Box.of(d) for d in json.loads(p.stdout)]
        return sorted((b for b in out if not service or b.service == service), key=lambda b: b.name)

    def one(self, service: str) -> Box:
        boxes = self.boxes(service)
        if len(boxes) != 1:
            raise Failed(f"{len(boxes)} {service} containers in project {self.name}, expected 1")
        return boxes[0]

    def logs(self, box: Box, tail: int = 0) -> str:
        cmd = [self.docker, "logs", *(["--tail", str(tail)] if tail else []), box.id]
        p = run(cmd, timeout=60)
        return p.stdout + p.stderr

    def committed(self) -> Optional[int]:
        """The coordinator's committed round (state.json in its state volume); None while it is down."""
        try:
            coord = self.one("coordinator")
        except Failed:
            return None
        if coord.status != "running":
            return None
        p = run([self.docker, "exec", coord.id, "cat", "/state/state.json"], timeout=30)
        if p.returncode != 0:
            return 0 if "No such file" in p.stderr else None
        try:
            return int(json.loads(p.stdout)["committed_round"])
        except (ValueError, KeyError):
            return None

    def leftovers(self) -> List[str]:
        f = ["--filter", f"label={PROJECT_LABEL}={self.name}"]
        out = []
        for what, cmd in (
            ("container", [self.docker, "ps", "-aq", *f]),
            ("network", [self.docker, "network", "ls", "-q", *f]),
            ("volume", [self.docker, "volume", "ls", "-q", *f]),
        ):
            p = run(cmd, timeout=30)
            out += [f"{what} {x}" for x in p.stdout.split()]
        return out


# ---------------------------------------------------------------- the run


@dataclass
class Observed:
    t_up: float = 0.0
    t_healthy: float = 0.0
    t_first_commit: float = 0.0
    t_rounds: float = 0.0
    coord_before: int = -1
    coord_after: int = -1
    shaping: Dict[str, str] = field(default_factory=dict)
    rounds_at_stop: int = 0


def fail_if_broken(pr: Project, expect_coordinator_down: bool = False) -> None:
    for b in pr.boxes():
        if b.service == "certs" and b.status == "exited" and b.exit_code != 0:
            raise Failed(f"certs exited {b.exit_code}: {pr.logs(b, 20)[-1500:]}")
        if b.service == "coordinator" and b.status in ("exited", "dead") and not expect_coordinator_down:
            raise Failed(f"the coordinator exited {b.exit_code}: {pr.logs(b, 30)[-2500:]}")
        if b.service == "peer" and b.status == "exited" and b.exit_code not in (0, 137, 143):
            raise Failed(f"peer {b.name} exited {b.exit_code}: {pr.logs(b, 30)[-2500:]}")
        if b.service == "chaos" and b.status == "exited" and b.exit_code != 0:
            raise Failed(f"chaos exited {b.exit_code}: {pr.logs(b, 30)[-2500:]}")


def note_first_commit(pr: Project, obs: Observed) -> int:
    c = pr.committed() or 0
    if c >= 1 and not obs.t_first_commit:
        obs.t_first_commit = time.monotonic()
        say(f"first commit {obs.t_first_commit - obs.t_up:.0f} s after up")
    return c


def wait_healthy(pr: Project, plan: Plan, obs: Observed) -> None:
    deadline = time.monotonic() + plan.healthy_timeout_s
    while True:
        fail_if_broken(pr)
        boxes = pr.boxes()
        peers = [b for b in boxes if b.service == "peer"]
        coord = [b for b in boxes if b.service == "coordinator"]
        certs = [b for b in boxes if b.service == "certs"]
        if coord and coord[0].status == "running":
            note_first_commit(pr, obs)
        healthy = (
            len(peers) == plan.peers
            and all(b.health == "healthy" for b in peers + coord)
            and len(coord) == 1
            and certs
            and certs[0].status == "exited"
        )
        if healthy:
            obs.t_healthy = time.monotonic()
            say(f"every healthcheck passes: coordinator and {len(peers)} peers ({obs.t_healthy - obs.t_up:.0f} s)")
            return
        if time.monotonic() > deadline:
            states = ", ".join(f"{b.name}={b.status}/{b.health or '-'}" for b in boxes)
            raise Failed(f"not every container healthy after {plan.healthy_timeout_s:g} s: {states}")
        time.sleep(1)


def claimed_ids(pr: Project, reader: Box) -> Dict[str, str]:
    """{container host name: the peer id it claimed}, from the peer-claims volume (through ``reader``)."""
    p = run([pr.docker, "exec", reader.id, "sh", "-c", "cd /claims && grep -H . * || true"], timeout=60)
    out = {}
    for line in p.stdout.splitlines():
        peer_id, _, host = line.partition(":")
        if host.strip():
            out[host.strip()] = peer_id.strip()
    return out


def victims_rejoined(pr: Project) -> bool:
    """Every chaos victim so far resumed from its checkpoint and took part in a round since (read from the
    peer-runs volume through a running peer)."""
    acts = chaos_actions(pr.logs(pr.one("chaos")))
    peers = {b.name: b for b in pr.boxes("peer")}
    reader = next((b for b in peers.values() if b.status == "running"), None)
    if reader is None:
        return False
    ids = claimed_ids(pr, reader)
    for victim in {a["victim"] for a in acts if a["verb"] in ("stop", "kill")}:
        if victim not in peers or peers[victim].hostname not in ids:
            return False
        p = run([pr.docker, "exec", reader.id, "cat", f"/runs/{ids[peers[victim].hostname]}/metrics.jsonl"], timeout=60)
        kinds = []
        for line in p.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kinds.append("resume" if rec.get("event") == "resume" else rec.get("kind"))
        if "resume" not in kinds or "round" not in kinds[len(kinds) - 1 - kinds[::-1].index("resume") :]:
            return False
    return True


def restart_coordinator(pr: Project, obs: Observed, committed: int) -> None:
    coord = pr.one("coordinator")
    say(f"stopping the coordinator's container at committed round {committed} (docker stop, then start)")
    obs.coord_before = committed
    t = time.monotonic()
    run([pr.docker, "stop", "-t", "10", coord.id], timeout=60, check=True)
    pr.events.append({"t": t, "event": "coordinator_restart"})
    time.sleep(3)
    run([pr.docker, "start", coord.id], timeout=60, check=True)
    for _ in range(60):
        c = pr.committed()
        if c is not None:
            obs.coord_after = c
            say(f"the coordinator is back from its state volume at committed round {c}")
            return
        time.sleep(1)
    raise Failed("the coordinator did not come back within 60 s of docker start")


def drive(pr: Project, plan: Plan, obs: Observed) -> None:
    # everything at once, in the compose file's order (certs done, coordinator healthy); chaos's schedule
    # starts at the first commit (it reads the coordinator's state volume)
    say(f"up: project {pr.name}, certs + coordinator (TLS, per-peer identities) + {plan.peers} peers + chaos")
    obs.t_up = time.monotonic()
    pr.compose_run("up", "-d", "--no-build", "--scale", f"peer={plan.peers}", timeout=900)
    wait_healthy(pr, plan, obs)
    deadline = time.monotonic() + plan.run_timeout_s
    while not note_first_commit(pr, obs):
        fail_if_broken(pr)
        if time.monotonic() > deadline:
            raise Failed(f"no round committed within {plan.run_timeout_s:g} s")
        time.sleep(1)
    say(f"chaos: {plan.chaos_actions} actions (stop, kill in turn), every {plan.chaos_every} s from the first commit")
    # The run goes on until it has committed the target rounds, chaos is done, the coordinator's container
    # has been restarted and every victim has taken part in a round after its resume: a round takes 0.1 s
    # to 1 s, depending on the machine, a restarted peer 5 s to 30 s. Then every peer is stopped (SIGTERM:
    # it leaves the run and checkpoints), as dtrain-sim ends a run.
    restarted = False
    committed = 0
    next_check = 0.0
    while True:
        boxes = pr.boxes()
        chaos_done = any(b.service == "chaos" and b.status == "exited" for b in boxes)
        c = pr.committed()
        committed = c if c is not None else committed
        # half-way, with chaos done (a peer down and the coordinator down at once would stop the run)
        if not restarted and chaos_done and committed >= plan.rounds // 2:
            restart_coordinator(pr, obs, committed)
            restarted = True
            continue
        # and the peers carried on: rounds committed by the coordinator that came back
        carried_on = restarted and committed >= obs.coord_after + AFTER_RESTART
        if committed >= plan.rounds and carried_on and time.monotonic() >= next_check:
            if victims_rejoined(pr):
                break
            next_check = time.monotonic() + 3
        if committed >= plan.max_rounds - 10:
            raise Failed(
                f"{committed} rounds committed (of a budget of {plan.max_rounds}) and chaos, the "
                "coordinator restart or a victim's rejoin is still missing"
            )
        if time.monotonic() > deadline:
            raise Failed(f"{committed} rounds committed after {plan.run_timeout_s:g} s (target {plan.rounds})")
        fail_if_broken(pr)
        time.sleep(1)
    obs.t_rounds = time.monotonic()
    obs.rounds_at_stop = committed
    say(
        f"{committed} rounds committed (target {plan.rounds}), {obs.t_rounds - obs.t_first_commit:.0f} s after "
        "the first commit; chaos done, coordinator restarted, every victim back: stopping the peers"
    )
    pr.compose_run("stop", "-t", "60", "peer", timeout=300)
    for b in pr.boxes("peer"):
        if b.status != "exited" or b.exit_code != 0:
            raise Failed(f"peer {b.name} ended {b.status} with exit {b.exit_code}: {pr.logs(b, 30)[-2500:]}")


# ---------------------------------------------------------------- the judgement


def collect(pr: Project, run_dir: str) -> Dict[str, str]:
    """The volumes' files into a dtrain-sim-like run dir; {peer id: its container's log}."""
    os.makedirs(run_dir)
    coord = pr.one("coordinator")
    run([pr.docker, "cp", f"{coord.id}:/state", os.path.join(run_dir, "coordinator")], timeout=120, check=True)
    peers = pr.boxes("peer")
    runs = os.path.join(pr.work, "runs")
    run([pr.docker, "cp", f"{peers[0].id}:/runs", runs], timeout=300, check=True)
    ids = claimed_ids(pr, peers[0])
    logs = {}
    for b in peers:
        peer_id = ids.get(b.hostname, "")
        src = os.path.join(runs, peer_id)
        if not peer_id or not os.path.isdir(src):
            raise Failed(f"peer {b.name} (host name {b.hostname}, id {peer_id or 'none claimed'}) left no run dir")
        os.rename(src, os.path.join(run_dir, f"peer-{peer_id}"))
        logs[peer_id] = pr.logs(b)
    pr.peer_ids = {b.name: ids[b.hostname] for b in peers}
    return logs


def chaos_actions(log: str) -> List[dict]:
    """The chaos service's actions and restorations, from its log lines."""
    out = []
    for line in log.splitlines():
        if not line.startswith("chaos: [") or "]" not in line:
            continue
        t = float(line[len("chaos: [") : line.index("]")].strip().rstrip("s"))
        words = line[line.index("]") + 1 :].split()
        if len(words) >= 2 and words[0] in ("stop", "kill", "pause") and "(action" in line:
            out.append({"t": t, "verb": words[0], "victim": words[1]})
        elif "failed" in line or (words and words[0] == "skip"):
            out.append({"t": t, "verb": "problem", "victim": "", "line": line})
        elif len(words) >= 2 and words[0] in ("start", "unpause"):
            out.append({"t": t, "verb": words[0], "victim": words[1]})
    return out


def judge(pr: Project, plan: Plan, obs: Observed, run_dir: str, logs: Dict[str, str], chaos_log: str) -> dict:
    from dtrain.sim.summary import read_jsonl, summarize

    acts = chaos_actions(chaos_log)
    names = dict(pr.peer_ids)  # container name -> the peer id it trained as
    with open(os.path.join(run_dir, "events.jsonl"), "w", encoding="utf-8") as f:
        for a in acts:
            if a["verb"] in ("stop", "kill"):
                f.write(json.dumps({"event": "kill", "signal": "TERM" if a["verb"] == "stop" else "KILL"}) + "\n")
            elif a["verb"] == "start":
                f.write(json.dumps({"event": "peer_start", "reason": "restart", "peer": a["victim"]}) + "\n")
        for ev in pr.events:
            f.write(json.dumps(ev) + "\n")
    lost_by_restart = 1 if 0 <= obs.coord_after < obs.coord_before else 0
    s = summarize(run_dir, plan.rounds, lost_by_restart=lost_by_restart)
    problems = [] if s["ok"] else [f"dtrain-sim's judge: {'; '.join(s['parity_problems'][:3]) or 'not ok'}"]
    if s["rounds_checked"] < plan.rounds:
        problems.append(f"only {s['rounds_checked']} of {plan.rounds} rounds have the peers' round records")
    downs = [a for a in acts if a["verb"] in ("stop", "kill")]
    backs = [a for a in acts if a["verb"] == "start"]
    trouble = [a["line"] for a in acts if a["verb"] == "problem"]
    want = ["stop", "kill"] * (plan.chaos_actions // 2) + ["stop"] * (plan.chaos_actions % 2)
    if [a["verb"] for a in downs] != want or len(backs) != len(downs) or trouble:
        problems.append(
            f"chaos: {[a['verb'] for a in downs]} and {len(backs)} starts, expected {want} and as many starts"
            + (f" ({trouble[0]})" if trouble else "")
        )
    # every victim resumed from its checkpoint in the peer-runs volume (a `resume` record, once per time it
    # went down) and took part in a round after its last resume
    rejoined = {}
    for victim in sorted({a["victim"] for a in downs}):
        peer_id = names.get(victim, "")
        if not peer_id:
            problems.append(f"chaos victim {victim} is not a peer container of this project")
            continue
        recs = read_jsonl(os.path.join(run_dir, f"peer-{peer_id}", "metrics.jsonl"))
        resumes = [i for i, r in enumerate(recs) if r.get("kind") == "run" and r.get("event") == "resume"]
        # (a victim taken down again while it was still starting writes one resume for two downs)
        later = resumes and any(r.get("kind") == "round" for r in recs[resumes[-1] :])
        rejoined[victim] = bool(later)
        if not resumes:
            problems.append(f"{victim} went down but never resumed from its checkpoint in the peer-runs volume")
        elif not later:
            problems.append(f"{victim} took part in no round after it resumed")
    if obs.coord_before < 0:
        problems.append("the coordinator was not restarted")
    elif s["rounds_committed"] < obs.coord_after + AFTER_RESTART:
        problems.append(
            f"only {s['rounds_committed'] - obs.coord_after} rounds committed after the coordinator restart"
        )
    elif lost_by_restart:
        problems.append(f"the coordinator came back at committed round {obs.coord_after}, before {obs.coord_before}")
    for peer_id, log in logs.items():
        line = next((ln for ln in log.splitlines() if "netem:" in ln), "")
        obs.shaping[peer_id] = line.split("entrypoint: ", 1)[-1]
        if not line:
            problems.append(f"peer {peer_id}: no shaping line in its log")
    rounds = [r for h in names.values() for r in read_jsonl(os.path.join(run_dir, f"peer-{h}", "metrics.jsonl"))]
    sent = sum(int(r.get("bytes_sent", 0)) for r in rounds if r.get("kind") == "round")
    s.update(
        compose_ok=not problems,
        compose_problems=problems,
        chaos=acts,
        rejoined=rejoined,
        bytes_per_round=sent / max(1, s["rounds_checked"]),
    )
    return s


def short(name: str) -> str:
    """A container's name without its project: peer_2 (1.29) or peer-2 (v2)."""
    return name.split("_", 1)[1] if "_" in name else name.split("-")[-2] + "-" + name.split("-")[-1]


def report(s: dict, plan: Plan, obs: Observed, build_s: Optional[float], compose: List[str]) -> str:
    from dtrain.obs.table import format_table, human

    util = s.get("compute_utilisation")
    downs = [a for a in s["chaos"] if a["verb"] in ("stop", "kill")]
    shaping = sorted(set(obs.shaping.values()))
    rows = [
        ["status", "ok" if s["ok"] and s["compose_ok"] else "FAILED"],
        ["engine / compose", f"{os.path.basename(compose[0])}{' compose' if len(compose) > 1 else ''}"],
        ["image build", "-" if build_s is None else f"{build_s:.0f} s"],
        ["every healthcheck passing", f"{obs.t_healthy - obs.t_up:.0f} s after up"],
        ["first commit", f"{obs.t_first_commit - obs.t_up:.0f} s after up"],
        [
            "rounds with chaos",
            f"{obs.rounds_at_stop} in {obs.t_rounds - obs.t_first_commit:.0f} s after the first commit",
        ],
        ["rounds committed", f"{s['rounds_committed']} of {s['rounds_target']}"],
        ["parity", ("ok" if s["parity"] else "FAILED") + f" ({s['rounds_checked']} rounds checked)"],
        ["rounds lost", str(s["rounds_lost"])],
        ["chaos", ", ".join(f"{a['verb']} {short(a['victim'])}" for a in downs) or "none"],
        ["victims rejoined", f"{sum(s['rejoined'].values())} of {len(s['rejoined'])} (resumed from their volume)"],
        [
            "coordinator restart",
            f"stopped at round {obs.coord_before}, back at {obs.coord_after}, "
            f"{s['rounds_committed'] - obs.coord_after} rounds after",
        ],
        ["recoveries", f"{s['recoveries']} ({s['heals']} heals, {s['retries']} round retries)"],
        ["bytes per round", f"{human(s['bytes_per_round'])}B (outer payload sent, all peers)"],
        ["bytes moved", f"outer {human(s['bytes_outer'])}B, state transfer {human(s['bytes_state_transfer'])}B"],
        ["compute utilisation", "-" if util is None else f"{100 * util:.1f}%"],
    ]
    rows += [["problem", p] for p in (s["compose_problems"] + s.get("parity_problems", []))[:8]]
    table = format_table(["compose-test", "value"], rows, "docker compose simulation summary")
    return "\n".join([table, *(f"shaping: {line}" for line in shaping)])


# ---------------------------------------------------------------- main


class Interrupted(BaseException):
    pass


def teardown(pr: Project) -> List[str]:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # tear down whatever comes
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        say(f"down -v: project {pr.name}")
        try:
            pr.compose_run("down", "-v", "--remove-orphans", "-t", "10", timeout=300, check=False)
        except Failed as e:
            say(f"down failed: {e}")
        # what compose did not remove (a container it no longer knew, one whose removal was still under
        # way: with the vfs storage driver a removal deletes a whole copy of the image): by hand, for 5 minutes
        deadline = time.monotonic() + 300
        while True:
            left = pr.leftovers()
            if not left or time.monotonic() > deadline:
                return left
            boxes = [x.split()[1] for x in left if x.startswith("container ")]
            try:
                for ident in boxes:
                    run([pr.docker, "rm", "-f", "-v", ident], timeout=600)
                for item in [] if boxes else left:
                    what, ident = item.split()
                    run([pr.docker, *(["network", "rm"] if what == "network" else ["volume", "rm", "-f"]), ident])
            except Failed as e:
                say(f"removing what is left: {e}")
            time.sleep(2)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="compose_test.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=Plan.peers)
    ap.add_argument("--rounds", type=int, default=Plan.rounds, help="rounds the run commits at least")
    ap.add_argument("--inner-steps", type=int, default=Plan.inner_steps, help="H: outer.sync_every")
    ap.add_argument("--chaos-actions", type=int, default=Plan.chaos_actions)
    ap.add_argument("--chaos-seed", type=int, default=Plan.chaos_seed)
    ap.add_argument("--torch", default=os.environ.get("TORCH", "torch==2.13.0"), help="the torch requirement")
    ap.add_argument("--no-build", action="store_true", help="use $DTRAIN_IMAGE as it is")
    ap.add_argument("--keep-logs", default="", help="copy the run dir and the containers' logs here")
    a = ap.parse_args(argv)
    if a.peers < 3 or a.rounds < 4 or a.chaos_actions < 2:
        ap.error("--peers >= 3 (chaos keeps 2 alive), --rounds >= 4, --chaos-actions >= 2 (a stop and a kill)")
    plan = Plan(
        peers=a.peers,
        rounds=a.rounds,
        inner_steps=a.inner_steps,
        chaos_actions=a.chaos_actions,
        chaos_seed=a.chaos_seed,
    )

    clis = docker_clis()
    version = next((v for v in (engine_answers(d) for d in clis) if v), "") if clis else ""
    if not version:
        why = "no docker client installed" if not clis else "no Docker engine answers (docker version)"
        say(f"skipped: {why}; start dockerd (e.g. `dockerd --storage-driver=vfs &` as root) to run it")
        return 0

    def on_term(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also where SIGINT came ignored (a background job)
    work = tempfile.mkdtemp(prefix="dtrain-compose-test.")
    pr: Optional[Project] = None
    rc = 1
    try:
        docker = next(d for d in clis if engine_answers(d))
        compose = compose_command(clis)
        say(f"engine {version}; {' '.join(os.path.basename(x) for x in compose)}; work dir {work}")
        image = os.environ.get("DTRAIN_IMAGE", "dtrain:compose-test")
        build_s = None
        if not a.no_build:
            builder = buildkit_cli(clis)
            base = base_image(docker)
            torch_wheel(a.torch)
            build_s = build(builder, image, base, a.torch, os.path.join(work, "build.log"))
            say(f"image {image} built in {build_s:.0f} s")
        pr = Project(
            docker=docker, compose=compose, name=f"dtrain-ct-{secrets.token_hex(3)}", env=plan.env(image), work=work
        )
        rc = test_run(pr, plan, build_s, compose, a.keep_logs)
    except Failed as e:
        say(f"FAILED: {e}")
        rc = 1
    except (KeyboardInterrupt, Interrupted):
        say("interrupted")
        rc = 130
    finally:
        if pr is not None:
            left = teardown(pr)
            if left:
                say(f"FAILED: left behind after down -v: {', '.join(left)}")
                rc = rc or 1
            else:
                say("nothing left behind (containers, networks, volumes)")
        if rc == 0 and not a.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    say("passed" if rc == 0 else f"work dir kept: {work}")
    return rc


def test_run(pr: Project, plan: Plan, build_s: Optional[float], compose: List[str], keep_logs: str) -> int:
    """Up, chaos, the rounds, the judgement; 0 passed. Failed otherwise. The caller tears down."""
    obs = Observed()
    ok = False
    try:
        drive(pr, plan, obs)
        run_dir = os.path.join(pr.work, "run")
        logs = collect(pr, run_dir)
        s = judge(pr, plan, obs, run_dir, logs, pr.logs(pr.one("chaos")))
        print(report(s, plan, obs, build_s, compose), flush=True)
        ok = s["ok"] and s["compose_ok"]
        if not ok:
            raise Failed("; ".join(s["compose_problems"][:4]) or "dtrain-sim's judge says the run is not ok")
        return 0
    finally:
        if keep_logs or not ok:
            keep = keep_logs or pr.work
            os.makedirs(keep, exist_ok=True)
            for b in pr.boxes():
                with open(os.path.join(keep, f"{b.name}.log"), "w", encoding="utf-8") as f:
                    f.write(pr.logs(b))
            if keep_logs and os.path.isdir(os.path.join(pr.work, "run")):
                shutil.copytree(os.path.join(pr.work, "run"), os.path.join(keep, "run"), dirs_exist_ok=True)
            say(f"logs of every container in {keep}")


if __name__ == "__main__":
    sys.exit(main())
