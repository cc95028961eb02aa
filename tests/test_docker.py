"""docker/: the compose file and the image definition (checked without a Docker engine), the
entrypoint's roles run as plain processes (certs -> coordinator with TLS and token -> 2 peers,
shaping off), the gRPC healthcheck, netem's command, and the chaos service against a fake Docker
Engine API served on a unix socket (real HTTP).

The same topology through dtrain-sim (a 2-rank torchrun peer and a 1-rank peer) is
tests/test_sim.py::test_whole_cluster_restart_with_mixed_world_sizes.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pytest
import yaml

from conftest import FAST_MBV3, REPO, VENV_BIN
from control_fixtures import read_jsonl, wait_for

DOCKER = os.path.join(REPO, "docker")
COMPOSE = os.path.join(DOCKER, "docker-compose.yml")
ENTRYPOINT = os.path.join(DOCKER, "entrypoint.py")
HEALTHCHECK = os.path.join(DOCKER, "healthcheck.py")
CHAOS = os.path.join(DOCKER, "chaos.py")
sys.path.insert(0, DOCKER)

import chaos as chaos_mod  # noqa: E402  (docker/chaos.py)
import netem  # noqa: E402  (docker/netem.py)
from envvars import EnvError  # noqa: E402


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DTRAIN_", "NETEM", "CHAOS_"))}
    env.update(PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1", NETEM="off")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes started by one test, each in its own session; all SIGKILLed by PID at teardown."""

    def __init__(self, tmp_path):
        self.dir, self.started = tmp_path, []

    def start(self, name, argv, env, stdout=None) -> subprocess.Popen:
        err = open(self.dir / f"{name}.err", "w")
        p = subprocess.Popen(
            argv,
            env=env,
            cwd=str(self.dir),
            stdin=subprocess.DEVNULL,
            stdout=stdout or err,
            stderr=err,
            start_new_session=True,
        )
        p.name, p.err_path, p._err = name, str(self.dir / f"{name}.err"), err
        self.started.append(p)
        return p

    def stderr(self, p) -> str:
        with open(p.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill_all(self) -> None:
        for p in reversed(self.started):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its session: the peer's own children too
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            if p.stdout is not None:
                p.stdout.close()
            p._err.close()


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.kill_all()


# ---------------------------------------------------------------- compose file and image


def test_compose_file_structure():
    with open(COMPOSE, encoding="utf-8") as f:
        doc = yaml.safe_load(f)  # YAML merge keys (<<) resolved
    svc = doc["services"]
    assert set(svc) == {"certs", "coordinator", "peer", "chaos"}
    for name, s in svc.items():
        assert s["build"]["dockerfile"] == "docker/Dockerfile" and s["command"][0] == name, name
        assert s.get("init") is True, name
    peer, coord, certs, chaos = svc["peer"], svc["coordinator"], svc["certs"], svc["chaos"]
    # scalable: no fixed name, no published host port
    assert "container_name" not in peer and "ports" not in peer
    assert "NET_ADMIN" in peer["cap_add"]
    for var in ("NETEM", "NETEM_DELAY_MS", "NETEM_JITTER_MS", "NETEM_LOSS_PCT", "NETEM_RATE_MBIT"):
        assert var in peer["environment"], var
    assert peer["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert peer["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert coord["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    for s in (peer, coord):
        assert "/opt/dtrain/docker/healthcheck.py" in s["healthcheck"]["test"]
    # certificates shared through a volume; state, checkpoints and run dirs in named volumes
    vol = lambda s: {v.split(":")[0]: v.split(":")[1] for v in s["volumes"]}  # noqa: E731
    assert vol(certs)["certs"] == "/certs" and vol(coord)["certs"] == "/certs" and vol(peer)["certs"] == "/certs"
    assert vol(coord)["coordinator-state"] == "/state" and vol(peer)["peer-runs"] == "/runs"
    # per-peer identities: the CA key and the cluster secret only where they are needed; claims shared by peers
    assert vol(certs)["private"] == "/private" and vol(coord)["private"] == "/private"
    assert "private" not in vol(peer) and "private" not in vol(chaos) and vol(peer)["peer-claims"] == "/claims"
    assert "DTRAIN_TOKEN" not in peer["environment"] and "DTRAIN_PEER_IDS" in peer["environment"]
    assert vol(chaos)["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert set(doc["volumes"]) == {"certs", "private", "coordinator-state", "peer-claims", "peer-runs"}
    assert chaos["environment"]["CHAOS_SERVICE"] == "peer"
    # done (CHAOS_MAX_ACTIONS) or stopped, chaos stays down; its schedule starts at the first commit
    assert chaos["restart"] == "on-failure" and "CHAOS_MAX_ACTIONS" in chaos["environment"]
    assert vol(chaos)["coordinator-state"] == "/state" and chaos["volumes"][-1].endswith(":ro")
    assert chaos["environment"]["CHAOS_STATE_FILE"] == "/state/state.json"


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="no docker-compose binary (apt install docker-compose)"
)
def test_compose_config_validates_and_takes_the_environment(tmp_path):
    env = {**os.environ, "NETEM_DELAY_MS": "123", "CHAOS_SEED": "7", "PEERS": "3", "DTRAIN_TOKEN": "s3cret"}
    p = subprocess.run(
        ["docker-compose", "-f", COMPOSE, "config"],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        cwd=str(tmp_path),
    )
    assert p.returncode == 0, p.stderr
    svc = yaml.safe_load(p.stdout)["services"]
    assert str(svc["peer"]["environment"]["NETEM_DELAY_MS"]) == "123"
    assert str(svc["chaos"]["environment"]["CHAOS_SEED"]) == "7"
    assert int(svc["peer"]["deploy"]["replicas"]) == 3
    assert svc["coordinator"]["environment"]["DTRAIN_TOKEN"] == "s3cret"


def test_dockerfile_shape():
    with open(os.path.join(DOCKER, "Dockerfile"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    # python:3.11-slim by default, any base by build arg (docker/base-image.sh makes one from Debian packages)
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM scratch AS wheelhouse", "FROM ${BASE_IMAGE}"]
    # the wheelhouse (docker/wheels or WHEELS) and the CA bundle secret are mounted, never copied into a layer
    assert "ARG WHEELS=docker/wheels" in text and "COPY ${WHEELS} /" in text
    assert text.count("--mount=type=bind,from=wheelhouse,target=/wheels") == 2
    assert text.count("--mount=type=secret,id=ca_bundle") == 2
    assert "ARG OFFLINE=0" in text and os.path.isdir(os.path.join(DOCKER, "wheels"))
    assert "download.pytorch.org/whl/cpu" in text and "iproute2" in text and "pip install --no-deps" in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert text.index("USER ") < text.index("ENTRYPOINT")
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and "docker/healthcheck.py" in text
    assert '"/opt/dtrain/docker/entrypoint.py"' in text
    for ln in lines:  # everything mounted or copied from the build context exists there
        for word in ln.replace(",", " ").split():
            if word.startswith("source="):
                assert os.path.exists(os.path.join(REPO, word[len("source=") :])), word
        if ln.startswith("cp -R "):
            for src in ln.rstrip("; \\").split()[2:-1]:
                assert os.path.exists(os.path.join(REPO, src)), src
    # the build context (BuildKit reads <Dockerfile>.dockerignore) holds what the image needs
    with open(os.path.join(DOCKER, "Dockerfile.dockerignore"), encoding="utf-8") as f:
        kept = {ln.strip()[1:] for ln in f if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "proto", "dtrain", "conf", "launch", "docker"} <= kept


# ---------------------------------------------------------------- entrypoint roles as processes


def entry(*args, **env):
    return subprocess.run(
        [sys.executable, ENTRYPOINT, *args], capture_output=True, text=True, timeout=30, env=base_env(**env)
    )


def test_entrypoint_refuses_bad_values(tmp_path):
    bad = entry("peer", NETEM="on", NETEM_DELAY_MS="abc", DTRAIN_CERTS_DIR=tmp_path)
    assert bad.returncode == 2
    assert "NETEM_DELAY_MS='abc' is not allowed: a number >= 0 (milliseconds)" in bad.stderr
    bad = entry("peer", DTRAIN_COORDINATOR="nohost", DTRAIN_CERTS_DIR=tmp_path)
    assert bad.returncode == 2 and "DTRAIN_COORDINATOR='nohost' is not allowed: host:port" in bad.stderr
    bad = entry("peer", DTRAIN_BIND_HOST="0.0.0.0", DTRAIN_DATA_PORT="0", DTRAIN_CERTS_DIR=tmp_path)
    assert bad.returncode == 2 and "DTRAIN_DATA_PORT='0' is not allowed" in bad.stderr
    bad = entry("coordinator", DTRAIN_PORT="70000", DTRAIN_CERTS_DIR=tmp_path)
    assert bad.returncode == 2 and "DTRAIN_PORT='70000' is not allowed: an integer in 0..65535" in bad.stderr
    bad = entry("worker")
    assert (
        bad.returncode == 2
        and "role 'worker' is not allowed: choose one of certs, coordinator, peer, chaos, status" in bad.stderr
    )
    late = entry(
        "coordinator", DTRAIN_CERTS_DIR=tmp_path / "none", DTRAIN_WAIT_S="0.2", DTRAIN_HEALTH_FILE=tmp_path / "h.json"
    )
    assert late.returncode == 1 and "no certificates in" in late.stderr


def test_netem_command():
    assert netem.netem_command({"NETEM": "off", "NETEM_DELAY_MS": "50"}) is None
    assert netem.netem_command({}) is None  # nothing to shape
    cmd = netem.netem_command(
        {
            "NETEM_DELAY_MS": "40",
            "NETEM_JITTER_MS": "5",
            "NETEM_LOSS_PCT": "0.5",
            "NETEM_RATE_MBIT": "100",
            "NETEM_DEV": "eth1",
        }
    )
    assert cmd == [
        "tc",
        "qdisc",
        "replace",
        "dev",
        "eth1",
        "root",
        "netem",
        "limit",
        "10000",
        "delay",
        "40ms",
        "5ms",
        "loss",
        "0.5%",
        "rate",
        "100mbit",
    ]
    assert netem.netem_command({"NETEM_RATE_MBIT": "10"})[-2:] == ["rate", "10mbit"]
    for env, msg in [
        ({"NETEM_LOSS_PCT": "150"}, "NETEM_LOSS_PCT='150' is not allowed: a number in 0..100"),
        ({"NETEM_JITTER_MS": "5"}, "NETEM_JITTER_MS='5' is not allowed without a delay"),
        ({"NETEM": "maybe"}, "NETEM='maybe' is not allowed: on or off"),
        ({"NETEM_DEV": "eth0; rm"}, "NETEM_DEV='eth0; rm' is not allowed"),
    ]:
        with pytest.raises(EnvError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            netem.netem_command(env)


PEER_ARGS = [
    *FAST_MBV3,
    "batch_size=16",
    "eval_batch_size=128",
    "calib_batches=2",
    "calib_batch_size=16",
    "log_every=1",
    "logger.progress=off",
    "threads=1",
    "steps=6",
    "outer.sync_every=2",
    "eval_every=0",
    "checkpoint_every=0",
    "eval_archs=[max]",
]


@pytest.mark.timeout(150)
def test_roles_as_processes_certs_coordinator_two_peers(tmp_path, procs, monkeypatch):
    from dtrain.config import TLSConfig
    from dtrain.control.status_view import StatusError, fetch_status

    certs, private = tmp_path / "certs", tmp_path / "private"
    common = dict(DTRAIN_CERTS_DIR=certs, DTRAIN_PRIVATE_DIR=private, DTRAIN_PEER_IDS="peer-1,peer-2,peer-3")
    common["DTRAIN_WAIT_S"] = 60
    # certs: CA, server certificate, one identity token per peer id and for the status tool, then the ready
    # marker; the CA key and a random cluster secret go to the private dir; a second run does nothing
    first = entry("certs", **common)
    assert first.returncode == 0, first.stderr
    for f in ("ca.pem", "server.pem", "server.key", "peer-1.token", "peer-3.token", "status.token", "ready"):
        assert (certs / f).exists(), f
    assert not (certs / "ca.key").exists() and (private / "ca.key").exists()
    assert stat.S_IMODE(os.stat(private / "secret").st_mode) == 0o600
    secret = (private / "secret").read_text().strip()
    assert len(secret) >= 32 and secret not in "".join(p.read_text() for p in certs.iterdir() if p.is_file())
    again = entry("certs", **common)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert (private / "secret").read_text().strip() == secret

    coord = procs.start(
        "coordinator",
        [sys.executable, ENTRYPOINT, "coordinator"],
        base_env(
            **common,
            DTRAIN_STATE_DIR=tmp_path / "state",
            DTRAIN_HOST="127.0.0.1",
            DTRAIN_PORT=0,
            DTRAIN_MIN_PEERS=2,
            DTRAIN_HEALTH_FILE=tmp_path / "coordinator-health.json",
            DTRAIN_COORDINATOR_ARGS="lease_timeout_s=3 heartbeat_interval_s=0.5 grace_s=0.5",
        ),
        stdout=subprocess.PIPE,
    )
    line = coord.stdout.readline().decode()
    assert line.startswith("coordinator listening on 127.0.0.1:"), procs.stderr(coord)
    address = line.split()[-1]

    peers = {}
    for pid in ("peer-1", "peer-2"):
        port = free_port()
        # peer-1 claims the first free identity; peer-2 is named (it must be one of DTRAIN_PEER_IDS)
        named = {} if pid == "peer-1" else dict(DTRAIN_PEER_ID=pid)
        peers[pid] = procs.start(
            pid,
            [sys.executable, ENTRYPOINT, "peer"],
            base_env(
                **common,
                **named,
                DTRAIN_CLAIMS_DIR=tmp_path / "claims",
                DTRAIN_RUNS_DIR=tmp_path / "runs",
                DTRAIN_COORDINATOR=address,
                DTRAIN_BIND_HOST="127.0.0.1",
                DTRAIN_DATA_PORT=port,
                DTRAIN_HEALTH_FILE=tmp_path / f"{pid}-health.json",
                DTRAIN_PEER_ARGS=shlex.join(PEER_ARGS),
                OMP_NUM_THREADS=1,
            ),
        )

    # while the peers start: the healthcheck, live coordinator (TLS) and a closed port
    hc = [
        sys.executable,
        HEALTHCHECK,
        "--address",
        address,
        "--tls-ca",
        str(certs / "ca.pem"),
        "--server-name",
        "dtrain",
    ]
    ok = subprocess.run(hc, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    closed = subprocess.run(
        hc[:3] + [f"127.0.0.1:{free_port()}", "--timeout", "1"], capture_output=True, text=True, timeout=30
    )
    assert closed.returncode == 1 and "unhealthy" in closed.stdout
    # TLS and identities are on: without a token the coordinator refuses
    tls = TLSConfig(ca=str(certs / "ca.pem"), server_name="dtrain")
    with pytest.raises(StatusError, match="refused the token"):
        fetch_status(address, tls=tls, token="", timeout_s=5)

    runs = {pid: tmp_path / "runs" / pid / "metrics.jsonl" for pid in peers}

    def rounds(pid):
        return [r for r in read_jsonl(str(runs[pid])) if r["kind"] == "round"]

    # a peer's data plane answers its healthcheck (the target its entrypoint wrote) while it trains
    monkeypatch.setenv("DTRAIN_HEALTH_FILE", str(tmp_path / "peer-1-health.json"))
    import healthcheck

    peer_healthy = []

    def progress():
        for p in (coord, *peers.values()):
            assert p.poll() is None or (p in peers.values() and p.returncode == 0), (
                f"{p.name} exited {p.returncode}:\n{procs.stderr(p)[-3000:]}"
            )
        if not peer_healthy and peers["peer-1"].poll() is None and healthcheck.main(["--timeout", "1"]) == 0:
            peer_healthy.append(True)
        return all(len(rounds(pid)) >= 1 for pid in peers)

    wait_for(progress, 110, "a committed round on both peers", interval=0.2)
    assert peer_healthy, "peer-1's data plane never answered its healthcheck"
    for p in peers.values():
        assert p.wait(60) == 0, procs.stderr(p)[-3000:]
    ra, rb = rounds("peer-1"), rounds("peer-2")
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):  # parity: the same global state after every round
        assert (x["round"], x["state_hash"]) == (y["round"], y["state_hash"])
        assert sorted(x["members"]) == ["peer-1", "peer-2"]
    assert (tmp_path / "claims" / "peer-1").read_text().strip() == socket.gethostname()
    # every call was bound to the identity each peer presented (none was refused)
    refused = [ln for ln in procs.stderr(coord).splitlines() if "refused" in ln and "no token" not in ln]
    assert not refused, refused  # (the one refusal is the test's own call without a token, above)
    # the status role: dtrain-status with the run's TLS and token
    st = entry("status", "json=true", **common, DTRAIN_COORDINATOR=address)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["committed_round"] == 3 and [c["round"] for c in status["commits"]] == [0, 1, 2]
    assert "no auth token configured" not in procs.stderr(coord)
    assert "identity: per-peer identity tokens" in procs.stderr(coord), procs.stderr(coord)[-2000:]


def test_identities_are_claimed_once_and_taken_back_by_their_holder(tmp_path):
    import entrypoint

    ids = ["peer-1", "peer-2"]
    claims = str(tmp_path / "claims")
    assert entrypoint.claim_identity(ids, claims, "box-a") == "peer-1"
    assert entrypoint.claim_identity(ids, claims, "box-b") == "peer-2"
    assert entrypoint.claim_identity(ids, claims, "box-a") == "peer-1"  # restarted: its own id back
    with pytest.raises(entrypoint.EnvError, match="DTRAIN_PEER_IDS has 2 identities"):
        entrypoint.claim_identity(ids, claims, "box-c")


@pytest.mark.parametrize(
    "env, needle",
    [
        (dict(DTRAIN_PEER_IDS="peer-1,peer-1"), "DTRAIN_PEER_IDS='peer-1,peer-1'"),
        (dict(DTRAIN_PEER_IDS="status"), "DTRAIN_PEER_IDS='status'"),
        (dict(DTRAIN_PEER_IDS="a b"), "DTRAIN_PEER_IDS='a b'"),
        (dict(DTRAIN_TOKEN="s3cret"), "DTRAIN_TOKEN is not allowed"),
        (dict(DTRAIN_PEER_ID="mallory", DTRAIN_PEER_IDS="peer-1"), "DTRAIN_PEER_ID='mallory'"),
    ],
)
def test_identity_settings_are_checked(tmp_path, env, needle):
    r = entry("peer", DTRAIN_CERTS_DIR=tmp_path / "certs", NETEM="off", **env)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- chaos


def test_chaos_schedule_is_seeded():
    every = (5.0, 10.0)
    a = chaos_mod.schedule(3, every, 60.0, 20)
    assert a == chaos_mod.schedule(3, every, 60.0, 20)
    assert a != chaos_mod.schedule(4, every, 60.0, 20)
    gaps = [a[0] - 60.0] + [y - x for x, y in zip(a, a[1:])]
    assert all(5.0 <= g <= 10.0 for g in gaps)
    names = ["p-1", "p-2", "p-3", "p-4"]
    picks = [chaos_mod.pick(3, i, names) for i in range(20)]
    assert picks == [chaos_mod.pick(3, i, list(reversed(names))) for i in range(20)]  # order does not matter
    assert len(set(picks)) > 1


class FakeDocker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The few Docker Engine API endpoints chaos.py uses, over HTTP on a unix socket."""

    daemon_threads = True

    def __init__(self, path, containers, project="proj"):
        self.containers, self.project, self.calls = containers, project, []
        self.lock = threading.Lock()
        super().__init__(path, FakeHandler)

    def state(self, name):
        return next(c["State"] for c in self.containers if c["Names"][0] == "/" + name)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def parse(self):
        u = urllib.parse.urlparse(self.path)
        assert u.path.startswith("/v1.41/"), u.path
        return u.path[len("/v1.41") :], dict(urllib.parse.parse_qsl(u.query))

    def do_GET(self):
        path, q = self.parse()
        srv = self.server
        with srv.lock:
            srv.calls.append(("GET", path, q))
            if path == "/_ping":
                return self.reply(200, "OK")
            if path == "/containers/json":
                want = json.loads(q["filters"])["label"]
                out = [c for c in srv.containers if q.get("all") == "1" or c["State"] == "running"]
                out = [c for c in out if all(w.split("=", 1)[1] == c["Labels"].get(w.split("=", 1)[0]) for w in want)]
                return self.reply(200, out)
            parts = path.split("/")
            if len(parts) == 4 and parts[3] == "json":  # inspect: any other id is the chaos container itself
                labels = {"com.docker.compose.project": srv.project, "com.docker.compose.service": "chaos"}
                return self.reply(200, {"Id": parts[2], "Config": {"Labels": labels}})
        self.reply(404, {"message": "page not found"})

    def do_POST(self):
        path, q = self.parse()
        srv = self.server
        _, _, cid, action = path.split("/")
        with srv.lock:
            srv.calls.append(("POST", path, q))
            c = next((c for c in srv.containers if c["Id"] == cid), None)
            if c is None:
                return self.reply(404, {"message": f"No such container: {cid}"})
            new = {"stop": "exited", "kill": "exited", "start": "running", "pause": "paused", "unpause": "running"}[
                action
            ]
            if c["State"] == new:
                return self.reply(304)
            c["State"] = new
        self.reply(204)


def container(name, service="peer", project="proj", state="running"):
    return {
        "Id": f"id-{name}",
        "Names": ["/" + name],
        "State": state,
        "Labels": {"com.docker.compose.project": project, "com.docker.compose.service": service},
    }


@pytest.fixture
def fake_docker():
    d = tempfile.mkdtemp(prefix="dk", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    servers = []

    def start(containers):
        srv = FakeDocker(os.path.join(d, "docker.sock"), containers)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        shutil.rmtree(d, ignore_errors=True)


def run_chaos(srv, timeout=20, **env):
    e = base_env(DOCKER_HOST=f"unix://{srv.server_address}", CHAOS_START_AFTER_S=0, **env)
    return subprocess.run([sys.executable, CHAOS], capture_output=True, text=True, timeout=timeout, env=e)


PEERS3 = ["proj-peer-1", "proj-peer-2", "proj-peer-3"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "action,verbs", [("stop", ("stop", "start")), ("kill", ("kill", "start")), ("pause", ("pause", "unpause"))]
)
def test_chaos_takes_down_seeded_victims_and_brings_them_back(fake_docker, action, verbs):
    others = [container("proj-coordinator-1", service="coordinator"), container("other-peer-1", project="other")]
    srv = fake_docker([container(n) for n in PEERS3] + others)
    p = run_chaos(
        srv, CHAOS_SEED=11, CHAOS_EVERY_S="[0.1,0.2]", CHAOS_DOWN_S=0.01, CHAOS_MAX_ACTIONS=3, CHAOS_ACTION=action
    )
    assert p.returncode == 0, p.stderr
    posts = [(path.split("/")[2], path.split("/")[3], q) for m, path, q in srv.calls if m == "POST"]
    # every victim is back before the next action: the seeded pick among all three each time
    expected = [chaos_mod.pick(11, i, PEERS3) for i in range(3)]
    assert [cid for cid, verb, _ in posts if verb == verbs[0]] == [f"id-{n}" for n in expected]
    assert [verb for _, verb, _ in posts] == [verbs[0], verbs[1]] * 3
    if action == "stop":
        assert posts[0][2] == {"t": "30"}
    if action == "kill":
        assert posts[0][2] == {"signal": "SIGKILL"}
    lists = [q for m, path, q in srv.calls if path == "/containers/json"]
    assert lists and all(
        sorted(json.loads(q["filters"])["label"])
        == ["com.docker.compose.project=proj", "com.docker.compose.service=peer"]
        for q in lists
    )
    assert all(c["State"] == "running" for c in srv.containers)
    assert p.stdout.count(f"s] {verbs[0]} proj-peer-") == 3 and p.stdout.count(f"s] {verbs[1]} proj-peer-") == 3


@pytest.mark.timeout(60)
def test_chaos_takes_the_actions_of_a_list_in_turn(fake_docker):
    srv = fake_docker([container(n) for n in PEERS3])
    p = run_chaos(
        srv, CHAOS_SEED=5, CHAOS_EVERY_S="[0.05,0.1]", CHAOS_DOWN_S=0.01, CHAOS_MAX_ACTIONS=4, CHAOS_ACTION="stop,kill"
    )
    assert p.returncode == 0, p.stderr
    posts = [(path.split("/")[2], path.split("/")[3], q) for m, path, q in srv.calls if m == "POST"]
    assert [verb for _, verb, _ in posts] == ["stop", "start", "kill", "start"] * 2
    assert [q for _, verb, q in posts if verb == "kill"] == [{"signal": "SIGKILL"}] * 2
    assert [cid for cid, verb, _ in posts if verb in ("stop", "kill")] == [
        f"id-{chaos_mod.pick(5, i, PEERS3)}" for i in range(4)
    ]
    assert "stop,kill every 0.05-0.1s" in p.stdout
    assert all(c["State"] == "running" for c in srv.containers)
    bad = subprocess.run(
        [sys.executable, CHAOS], capture_output=True, text=True, timeout=20, env=base_env(CHAOS_ACTION="stop,reboot")
    )
    assert bad.returncode == 2 and "CHAOS_ACTION='stop,reboot' is not allowed" in bad.stderr


@pytest.mark.timeout(60)
def test_chaos_schedule_starts_at_the_first_commit(fake_docker, tmp_path):
    srv = fake_docker([container(n) for n in PEERS3])
    state = tmp_path / "state.json"
    e = base_env(
        DOCKER_HOST=f"unix://{srv.server_address}",
        CHAOS_START_AFTER_S=0,
        CHAOS_EVERY_S="0.05",
        CHAOS_DOWN_S=0.01,
        CHAOS_MAX_ACTIONS=1,
        CHAOS_STATE_FILE=state,
    )
    proc = subprocess.Popen(
        [sys.executable, CHAOS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
        start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # no state file, then a state before any commit: no action
        state.write_text('{"committed_round": 0}')
        time.sleep(1.0)
        assert proc.poll() is None and not [c for c in srv.calls if c[0] == "POST"]
        state.write_text('{"committed_round": 1, "state_hash": "ab"}')
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"waiting for the first commit in {state}" in out and "committed round 1: the schedule starts" in out
    assert [c[1].split("/")[3] for c in srv.calls if c[0] == "POST"] == ["stop", "start"]


@pytest.mark.timeout(60)
def test_chaos_keeps_min_alive_and_restores_on_sigterm(fake_docker):
    srv = fake_docker([container(n) for n in PEERS3[:2]])
    p = run_chaos(srv, CHAOS_EVERY_S="0.05", CHAOS_MIN_ALIVE=2, CHAOS_MAX_ACTIONS=2, CHAOS_PROJECT="proj")
    assert p.returncode == 0, p.stderr
    assert not [c for c in srv.calls if c[0] == "POST"] and p.stdout.count("skip action") == 2
    assert not [c for c in srv.calls if c[1].endswith("/json") and c[1] != "/containers/json"]  # no inspect

    # a victim that is down when chaos is told to stop is brought back before it exits
    e = base_env(
        DOCKER_HOST=f"unix://{srv.server_address}",
        CHAOS_START_AFTER_S=0,
        CHAOS_EVERY_S="0.05",
        CHAOS_DOWN_S=600,
        CHAOS_MIN_ALIVE=1,
    )
    proc = subprocess.Popen(
        [sys.executable, CHAOS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
        start_new_session=True,
    )
    try:
        wait_for(lambda: any(c["State"] == "exited" for c in srv.containers), 20, "a stopped peer")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert all(c["State"] == "running" for c in srv.containers), out
    assert "start proj-peer-" in out


def test_chaos_refuses_bad_values_and_a_missing_engine(tmp_path):
    env = base_env(CHAOS_EVERY_S="[5,2]")
    p = subprocess.run([sys.executable, CHAOS], capture_output=True, text=True, timeout=20, env=env)
    assert p.returncode == 2 and "CHAOS_EVERY_S='[5,2]' is not allowed: [X,Y] seconds with 0 < X <= Y" in p.stderr
    p = subprocess.run(
        [sys.executable, CHAOS], capture_output=True, text=True, timeout=20, env=base_env(CHAOS_ACTION="reboot")
    )
    assert p.returncode == 2 and "CHAOS_ACTION='reboot' is not allowed: choose one of stop, kill, pause" in p.stderr
    p = subprocess.run(
        [sys.executable, CHAOS],
        capture_output=True,
        text=True,
        timeout=20,
        env=base_env(DOCKER_HOST="tcp://1.2.3.4:2375"),
    )
    assert p.returncode == 2 and "DOCKER_HOST='tcp://1.2.3.4:2375' is not allowed" in p.stderr
    p = subprocess.run(
        [sys.executable, CHAOS],
        capture_output=True,
        text=True,
        timeout=20,
        env=base_env(DOCKER_HOST=f"unix://{tmp_path}/none.sock", CHAOS_PROJECT="x"),
    )
    assert p.returncode == 1 and "cannot be reached" in p.stderr
