"""The container's entrypoint: one role per container, configured from environment variables.

    entrypoint.py certs                      # one-shot: CA, server certificate, per-peer identities
    entrypoint.py coordinator [overrides]    # dtrain-coordinator with TLS and the cluster secret
    entrypoint.py peer [overrides]           # claim an identity, netem shaping, then one peer (launch/torchrun.sh)
    entrypoint.py chaos                      # stops and starts random peers (docker/chaos.py)
    entrypoint.py status [overrides]         # dtrain-status of the coordinator, as the status tool

Every role runs as a plain process too (outside a container; then set NETEM=off and point the
directories somewhere writable): the tests do exactly that.

Per-peer identities: the certs role writes one identity token per id of DTRAIN_PEER_IDS (and one for
the status tool) from the cluster secret; a peer container claims the first free id (a file in the
claims dir made with O_EXCL, holding its host name, so a restarted container takes its own id back)
and presents that id's token; the coordinator, which alone holds the secret, binds every call to the
id the token names. The CA key and the secret live in the private dir, which only the certs and
coordinator roles mount.

Common: DTRAIN_CERTS_DIR (/certs), DTRAIN_PRIVATE_DIR (/private), DTRAIN_TLS (on|off, on),
DTRAIN_PEER_IDS (peer-1,...,peer-8: the identities issued, at most that many peers at once),
DTRAIN_WAIT_S (how long coordinator and peers wait for the certs role, 120), DTRAIN_HEALTH_FILE
(/tmp/dtrain-health.json, read by docker/healthcheck.py).
certs: DTRAIN_CERT_HOSTS (dtrain,coordinator,localhost,127.0.0.1: the server certificate's names;
the first is the name every TLS client checks), DTRAIN_CERT_DAYS (365), DTRAIN_SECRET (the cluster
secret; default: a random one, kept in the private dir).
coordinator: DTRAIN_STATE_DIR (/state), DTRAIN_HOST (0.0.0.0), DTRAIN_PORT (7070), DTRAIN_MIN_PEERS,
DTRAIN_COORDINATOR_ARGS (extra overrides, shell words).
peer: DTRAIN_COORDINATOR (coordinator:7070), DTRAIN_CLAIMS_DIR (/claims), DTRAIN_RUNS_DIR (/runs;
the run dir is <runs dir>/<peer id>), DTRAIN_PEER_ID (default: the claimed id; given, it must be
one of DTRAIN_PEER_IDS), DTRAIN_BIND_HOST (0.0.0.0), DTRAIN_DATA_PORT (7071), DTRAIN_ADVERTISE
(default: this container's IP address), NPROC_PER_NODE (1), DTRAIN_PEER_ARGS (extra overrides, shell
words), NETEM* (docker/netem.py). A peer whose run dir holds a checkpoint resumes from it.
status: DTRAIN_COORDINATOR (coordinator:7070).

Exit status: that of the role's program; 2 for a bad environment value (one line on stderr).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List, Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from envvars import EnvError, hostport, integer, number, switch, text, words  # noqa: E402

PROG = "entrypoint"
ROLES = ("certs", "coordinator", "peer", "chaos", "status")
READY = "ready"  # written by the certs role after everything else
SECRET_FILE = "secret"  # the cluster secret, in the private dir
PRIVATE_FILES = ("ca.key",)  # moved from the certs dir into the private dir (nobody else may mint certificates)
STATUS_TOOL = "status"
DEFAULT_PEER_IDS = ",".join(f"peer-{i}" for i in range(1, 9))
_PEER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """A console script beside this interpreter (a venv's bin), else the bare name (PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name


def write_health(
    env: Mapping[str, str],
    role: str,
    address=None,
    tls_ca: str = "",
    server_name: str = "",
    accept_unimplemented: bool = False,
) -> None:
    path = text(env, "DTRAIN_HEALTH_FILE", "/tmp/dtrain-health.json")
    target = {
        "role": role,
        "address": address,
        "tls_ca": tls_ca,
        "server_name": server_name,
        "accept_unimplemented": accept_unimplemented,
    }
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(target, f)
    os.replace(tmp, path)


def local_address(host: str, port: int) -> str:
    """Where a healthcheck inside this container reaches a server bound to host:port."""
    return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}"


# ---------------------------------------------------------------- certificates and token


class Certs:
    def __init__(self, env: Mapping[str, str]):
        self.dir = os.path.abspath(text(env, "DTRAIN_CERTS_DIR", "/certs"))
        self.private = os.path.abspath(text(env, "DTRAIN_PRIVATE_DIR", "/private"))
        self.tls = switch(env, "DTRAIN_TLS", True)
        self.hosts = [
            h.strip()
            for h in text(env, "DTRAIN_CERT_HOSTS", "dtrain,coordinator,localhost,127.0.0.1").split(",")
            if h.strip()
        ]
        if not self.hosts:
            raise EnvError(
                f"DTRAIN_CERT_HOSTS={env.get('DTRAIN_CERT_HOSTS')!r} is not allowed: comma-separated host names"
            )
        self.server_name = text(env, "DTRAIN_TLS_SERVER_NAME", self.hosts[0])
        self.peer_ids = peer_ids(env)
        if env.get("DTRAIN_TOKEN"):
            raise EnvError(
                "DTRAIN_TOKEN is not allowed here: every peer gets its own identity from the cluster secret "
                "(DTRAIN_SECRET, or a random one); unset DTRAIN_TOKEN"
            )

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def wait(self, env: Mapping[str, str]) -> None:
        """Until the certs role has finished (its ready marker), or exit 1 after DTRAIN_WAIT_S."""
        wait_s = number(env, "DTRAIN_WAIT_S", 120.0, unit="seconds")
        deadline = time.monotonic() + wait_s
        while not os.path.exists(self.path(READY)):
            if time.monotonic() > deadline:
                say(
                    f"error: no certificates in {self.dir} after DTRAIN_WAIT_S={wait_s:g}s: "
                    "run the certs role first (docker compose starts it)"
                )
                sys.exit(1)
            time.sleep(0.2)

    def secret(self) -> str:
        """The cluster secret (the certs role wrote it into the private dir)."""
        path = os.path.join(self.private, SECRET_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise EnvError(
                f"DTRAIN_PRIVATE_DIR={self.private!r} is not allowed: {path} cannot be read "
                f"({e.strerror or e}); mount the private volume the certs role wrote"
            ) from None

    def token_of(self, name: str) -> str:
        """The identity token the certs role issued to ``name`` (a peer id or a tool)."""
        with open(self.path(f"{name}.token"), encoding="utf-8") as f:
            return f.read().strip()


def peer_ids(env: Mapping[str, str]) -> List[str]:
    """DTRAIN_PEER_IDS: the ids identities are issued to (distinct, each a valid peer id)."""
    raw = text(env, "DTRAIN_PEER_IDS", DEFAULT_PEER_IDS)
    ids = [p.strip() for p in raw.split(",") if p.strip()]
    bad = [p for p in ids if not _PEER_ID.fullmatch(p) or p == STATUS_TOOL]
    if not ids or bad or len(set(ids)) != len(ids):
        raise EnvError(
            f"DTRAIN_PEER_IDS={raw!r} is not allowed: distinct comma-separated peer ids "
            f"(letters, digits, '.', '_', '-'; not {STATUS_TOOL!r})"
        )
    return ids


def claim_identity(ids: List[str], claims_dir: str, holder: str) -> str:
    """The id this container (``holder``, its host name) trains as: the one it claimed before, else the first
    free one, claimed by creating ``<claims dir>/<id>`` exclusively (two containers never get the same id)."""
    os.makedirs(claims_dir, exist_ok=True)
    for pid in ids:  # a restarted container takes its own id back
        try:
            with open(os.path.join(claims_dir, pid), encoding="utf-8") as f:
                if f.read().strip() == holder:
                    return pid
        except FileNotFoundError:
            pass
    for pid in ids:
        try:
            fd = os.open(os.path.join(claims_dir, pid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(holder + "\n")
        return pid
    raise EnvError(
        f"DTRAIN_PEER_IDS has {len(ids)} identities and other containers hold every one "
        f"(claims in {claims_dir}): issue more ids or run fewer peers"
    )


def role_certs(env: Mapping[str, str], extra: List[str]) -> int:
    c = Certs(env)
    write_health(env, "certs")
    days = integer(env, "DTRAIN_CERT_DAYS", 365, lo=1)
    if os.path.exists(c.path(READY)):
        say(f"certificates and identities already in {c.dir}: nothing to do")
        return 0
    os.makedirs(c.dir, exist_ok=True)
    os.makedirs(c.private, mode=0o700, exist_ok=True)
    secret_path = os.path.join(c.private, SECRET_FILE)
    secret = env.get("DTRAIN_SECRET", "")
    if not secret and os.path.exists(secret_path):
        secret = c.secret()  # a previous run stopped half-way: keep its secret
    if not secret:
        secret = secrets.token_urlsafe(32)
        say(f"wrote a random cluster secret to {secret_path} (DTRAIN_SECRET was not set)")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    ids = "[" + ",".join(c.peer_ids) + "]"
    # overwrite: a previous run may have stopped half-way (no ready marker)
    runs = [[f"out_dir={c.dir}", f"clients={ids}", f"tools=[{STATUS_TOOL}]", "certificates=false", "overwrite=true"]]
    if c.tls:
        hosts = "[" + ",".join(c.hosts) + "]"
        runs.insert(
            0, [f"out_dir={c.dir}", f"hosts={hosts}", f"days={days}", "clients=[]", "tools=[]", "overwrite=true"]
        )
    for args in runs:
        rc = subprocess.run(
            [tool("dtrain-certs"), *args, *extra], stdin=subprocess.DEVNULL, env={**env, "DTRAIN_SECRET": secret}
        ).returncode
        if rc != 0:
            say(f"error: dtrain-certs failed with status {rc}")
            return rc
    for name in PRIVATE_FILES:
        if os.path.exists(c.path(name)):
            shutil.move(c.path(name), os.path.join(c.private, name))
    say(f"identities for {', '.join(c.peer_ids)} and the {STATUS_TOOL} tool in {c.dir}")
    with open(c.path(READY), "w", encoding="utf-8") as f:
        f.write(f"{time.time():.0f}\n")
    return 0


# ---------------------------------------------------------------- coordinator


def role_coordinator(env: Mapping[str, str], extra: List[str]) -> int:
    c = Certs(env)
    state_dir = text(env, "DTRAIN_STATE_DIR", "/state")
    host = text(env, "DTRAIN_HOST", "0.0.0.0")
    port = integer(env, "DTRAIN_PORT", 7070, hi=65535)
    args = [f"state_dir={state_dir}", f"host={host}", f"port={port}"]
    if text(env, "DTRAIN_MIN_PEERS"):
        args.append(f"min_peers={integer(env, 'DTRAIN_MIN_PEERS', 1, lo=1)}")
    args += words(env, "DTRAIN_COORDINATOR_ARGS")
    c.wait(env)
    child = dict(env)
    child["DTRAIN_SECRET"] = c.secret()  # conf/coordinator.yaml reads auth.secret from it
    if c.tls:
        args += [f"tls.cert={c.path('server.pem')}", f"tls.key={c.path('server.key')}"]
    write_health(
        env, "coordinator", local_address(host, port), c.path("ca.pem") if c.tls else "", c.server_name if c.tls else ""
    )
    cmd = [tool("dtrain-coordinator"), *args, *extra]
    say(f"coordinator on {host}:{port}, state dir {state_dir}, TLS {'on' if c.tls else 'off'}, per-peer identities")
    os.execvpe(cmd[0], cmd, child)
    return 0  # not reached


# ---------------------------------------------------------------- peer


def container_ip() -> str:
    """This container's address on its network (what other containers reach it by)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise EnvError(
            f"DTRAIN_ADVERTISE='' is not allowed here: this host's name does not resolve ({e}); "
            "give DTRAIN_ADVERTISE=host or host:port"
        ) from None


def peer_env(env: Mapping[str, str], c: Certs) -> Dict[str, str]:
    """The environment launch/torchrun.sh runs the peer with (its id is claimed once the certs are there)."""
    child = dict(env)
    child["DTRAIN_COORDINATOR"] = hostport(env, "DTRAIN_COORDINATOR", "coordinator:7070")
    peer_id = text(env, "DTRAIN_PEER_ID")
    if peer_id and peer_id not in c.peer_ids:
        raise EnvError(
            f"DTRAIN_PEER_ID={peer_id!r} is not allowed: it has no identity; use one of DTRAIN_PEER_IDS "
            f"({', '.join(c.peer_ids)}) or leave it unset to claim a free one"
        )
    child["DTRAIN_IDENTITY_DIR"] = c.dir  # launch/torchrun.sh presents <id>.token
    bind = text(env, "DTRAIN_BIND_HOST", "0.0.0.0")
    port = integer(env, "DTRAIN_DATA_PORT", 7071, hi=65535)
    child["DTRAIN_BIND_HOST"], child["DTRAIN_DATA_PORT"] = bind, str(port)
    advertise = text(env, "DTRAIN_ADVERTISE")
    if not advertise and bind in ("0.0.0.0", "::"):
        if port == 0:
            raise EnvError(
                "DTRAIN_DATA_PORT='0' is not allowed with DTRAIN_BIND_HOST="
                + bind
                + ": give a fixed port so that the address can be advertised"
            )
        advertise = container_ip()
    if advertise:
        child["DTRAIN_ADVERTISE"] = advertise
    else:
        child.pop("DTRAIN_ADVERTISE", None)
    integer(env, "NPROC_PER_NODE", 1, lo=1)
    if c.tls:
        child.update(
            DTRAIN_TLS_CA=c.path("ca.pem"),
            DTRAIN_TLS_CERT=c.path("server.pem"),
            DTRAIN_TLS_KEY=c.path("server.key"),
            DTRAIN_TLS_SERVER_NAME=c.server_name,
        )
    child.setdefault("OMP_NUM_THREADS", "1")
    child.setdefault("DTRAIN_TRAIN", tool("dtrain-train"))
    child.setdefault("TORCHRUN", tool("torchrun"))
    return child


def role_peer(env: Mapping[str, str], extra: List[str]) -> int:
    import netem

    c = Certs(env)
    netem.netem_command(env)  # refuse bad values before waiting for anything
    extra = words(env, "DTRAIN_PEER_ARGS") + extra
    child = peer_env(env, c)
    c.wait(env)
    peer_id = text(env, "DTRAIN_PEER_ID") or claim_identity(
        c.peer_ids, text(env, "DTRAIN_CLAIMS_DIR", "/claims"), socket.gethostname()
    )
    child["DTRAIN_PEER_ID"] = peer_id
    child["DTRAIN_RUN_DIR"] = os.path.join(text(env, "DTRAIN_RUNS_DIR", "/runs"), peer_id)
    say(netem.apply(env))  # never fails: a kernel without netem gets tbf, or no shaping, and a warning
    launcher = text(env, "DTRAIN_LAUNCH", os.path.join(os.path.dirname(HERE), "launch", "torchrun.sh"))
    port = int(child["DTRAIN_DATA_PORT"])
    write_health(
        env,
        "peer",
        local_address(child["DTRAIN_BIND_HOST"], port),
        child.get("DTRAIN_TLS_CA", ""),
        child.get("DTRAIN_TLS_SERVER_NAME", ""),
    )
    say(
        f"peer {child['DTRAIN_PEER_ID']} -> coordinator {child['DTRAIN_COORDINATOR']}, run dir "
        f"{child['DTRAIN_RUN_DIR']}, data plane {child['DTRAIN_BIND_HOST']}:{port} advertised as "
        f"{child.get('DTRAIN_ADVERTISE', '(bind address)')}, TLS {'on' if c.tls else 'off'}"
    )
    cmd = [launcher, *extra]
    os.execve(launcher, cmd, child)
    return 0  # not reached


# ---------------------------------------------------------------- chaos


def role_chaos(env: Mapping[str, str], extra: List[str]) -> int:
    write_health(env, "chaos")
    script = os.path.join(HERE, "chaos.py")
    os.execv(sys.executable, [sys.executable, script, *extra])
    return 0  # not reached


# ---------------------------------------------------------------- status


def role_status(env: Mapping[str, str], extra: List[str]) -> int:
    c = Certs(env)
    address = hostport(env, "DTRAIN_COORDINATOR", "coordinator:7070")
    c.wait(env)
    child = dict(env)
    child["DTRAIN_TOKEN"] = c.token_of(STATUS_TOOL)
    args = [f"coordinator={address}"]
    if c.tls:
        args += [f"tls.ca={c.path('ca.pem')}", f"tls.server_name={c.server_name}"]
    cmd = [tool("dtrain-status"), *args, *extra]
    os.execvpe(cmd[0], cmd, child)
    return 0  # not reached


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    role, extra = argv[0], argv[1:]
    handlers = {
        "certs": role_certs,
        "coordinator": role_coordinator,
        "peer": role_peer,
        "chaos": role_chaos,
        "status": role_status,
    }
    if role not in handlers:
        say(f"error: role {role!r} is not allowed: choose one of {', '.join(ROLES)}")
        return 2
    try:
        return handlers[role](os.environ, extra)
    except EnvError as e:
        say(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
