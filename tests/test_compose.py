"""`make compose-test` without a Docker engine: its skip line, its judgement of a run (parity, chaos, the
victims' resumes, the coordinator restart) on a run dir laid out as it collects one, the settings it
hands the compose file, the WAN shaping's fallback (netem -> tbf -> none) with a fake `tc`, the Debian
base image script's refusals, and the Makefile's targets.

The run itself (base image, build, 4 peers, chaos, parity, teardown) needs an engine: `make compose-test`
(`make acceptance` runs it when an engine answers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

DOCKER = os.path.join(REPO, "docker")
COMPOSE_TEST = os.path.join(DOCKER, "compose_test.py")
BASE_IMAGE_SH = os.path.join(DOCKER, "base-image.sh")
sys.path.insert(0, DOCKER)

import chaos as chaos_mod  # noqa: E402  (docker/chaos.py)
import compose_test as ct  # noqa: E402  (docker/compose_test.py)
import netem  # noqa: E402  (docker/netem.py)


def fake_tool(d, name, body):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


# ---------------------------------------------------------------- the skip without an engine


def test_skips_with_one_line_without_an_engine(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER")}
    # no docker client at all
    p = subprocess.run(
        [sys.executable, COMPOSE_TEST], capture_output=True, text=True, timeout=60, env={**env, "PATH": str(tmp_path)}
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "compose-test: skipped: no docker client installed; start dockerd (e.g. `dockerd --storage-driver=vfs &` "
        "as root) to run it"
    ]
    # a client whose engine does not answer
    fake_tool(tmp_path, "docker", "echo 'Cannot connect to the Docker daemon' >&2; exit 1")
    p = subprocess.run(
        [sys.executable, COMPOSE_TEST], capture_output=True, text=True, timeout=60, env={**env, "PATH": str(tmp_path)}
    )
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 and "compose-test: skipped: no Docker engine answers" in p.stdout


def test_buildkit_client_choice(tmp_path):
    # a docker 28 client without buildx cannot build with BuildKit; a 20.10 one can (built in)
    new = tmp_path / "new"
    old = tmp_path / "old"
    new.mkdir()
    old.mkdir()
    fake_tool(new, "docker", '[ "$1" = buildx ] && exit 1; echo 28.2.2')
    fake_tool(old, "docker", '[ "$1" = buildx ] && exit 1; echo 20.10.24+dfsg1')
    assert ct.buildkit_cli([str(new / "docker"), str(old / "docker")]) == str(old / "docker")
    with pytest.raises(ct.Failed, match="no docker client here builds with BuildKit"):
        ct.buildkit_cli([str(new / "docker")])
    fake_tool(new, "docker", '[ "$1" = buildx ] && exit 0; echo 28.2.2')
    assert ct.buildkit_cli([str(new / "docker"), str(old / "docker")]) == str(new / "docker")


# ---------------------------------------------------------------- the judgement of a collected run


class FakeProject:
    """What judge() asks of a compose project: its peer containers and the events the driver injected."""

    def __init__(self, hosts):
        self.hosts, self.events = hosts, [{"t": 0.0, "event": "coordinator_restart"}]
        # the peer ids the containers claimed (collect() reads them); here each trains as its host name
        self.peer_ids = {f"proj_peer_{i + 1}": h for i, h in enumerate(hosts)}

    def boxes(self, service=""):
        return [
            ct.Box(id=f"id{i}", name=f"proj_peer_{i + 1}", service="peer", hostname=h, status="exited", exit_code=0,
                   health="", restarts=0)
            for i, h in enumerate(self.hosts)
        ]  # fmt: skip


def write_run(run_dir, hosts, rounds, resumes=None, bad_round=None):
    """A run dir as collect() lays it out: peer-<host>/metrics.jsonl, coordinator/{state.json,events.jsonl}."""
    resumes = resumes or {}
    os.makedirs(run_dir / "coordinator")
    commits = []
    for r in range(rounds):
        commits.append({"event": "commit", "round": r, "quorum_id": r + 1, "state_hash": f"h{r}"})
    with open(run_dir / "coordinator" / "events.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in commits)
    with open(run_dir / "coordinator" / "state.json", "w") as f:
        json.dump({"committed_round": rounds}, f)
    for h in hosts:
        os.makedirs(run_dir / f"peer-{h}")
        recs = [{"kind": "run", "event": "start", "step": 0}]
        for r in range(rounds):
            if r in resumes.get(h, ()):
                recs.append({"kind": "run", "event": "resume", "step": 4 * r})
            digest = f"h{r + 1}" if (h, r) != bad_round else "other"
            recs.append({"kind": "round", "round": r, "state_hash": digest, "members": hosts, "bytes_sent": 1000})
        with open(run_dir / f"peer-{h}" / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in recs)


CHAOS_LOG = """chaos: [     0.0s] project proj, service peer: stop,kill every 4-6s after 1s, down 5s, seed 0
chaos: [     0.1s] waiting for the first commit in /state/state.json
chaos: [     5.1s] stop proj_peer_1 (action 0); back in 5s
chaos: [    10.2s] start proj_peer_1
chaos: [    10.9s] kill proj_peer_2 (action 1); back in 5s
chaos: [    16.0s] start proj_peer_2 (already running)
"""


def judged(tmp_path, **kw):
    hosts = ["aaa", "bbb", "ccc"]
    run_dir = tmp_path / "run"
    write_run(run_dir, hosts, 8, **kw)
    plan = ct.Plan(peers=3, rounds=8, chaos_actions=2)
    obs = ct.Observed(coord_before=3, coord_after=3)
    logs = {
        h: "entrypoint: netem: warning: no netem here (...): rate-only shaping of eth0, tbf rate 100mbit" for h in hosts
    }
    return ct.judge(FakeProject(hosts), plan, obs, str(run_dir), logs, CHAOS_LOG), plan, obs


def test_judge_passes_a_run_with_parity_resumes_and_a_coordinator_restart(tmp_path):
    s, plan, obs = judged(tmp_path, resumes={"aaa": [3], "bbb": [5]})
    assert s["ok"] and s["compose_ok"], s["compose_problems"] + s["parity_problems"]
    assert s["rounds_checked"] == 8 and s["rounds_lost"] == 0
    assert [a["verb"] for a in s["chaos"]] == ["stop", "start", "kill", "start"]
    assert s["rejoined"] == {"proj_peer_1": True, "proj_peer_2": True}
    assert s["faults"] == {"kill_term": 1, "kill_kill": 1, "coordinator_restart": 1}
    assert s["bytes_per_round"] == 3000
    table = ct.report(s, plan, obs, 12.0, ["docker-compose"])
    assert "docker compose simulation summary" in table and "parity" in table and "ok (8 rounds checked)" in table
    assert "rate-only shaping" in table


def test_judge_fails_a_disagreement_a_missing_resume_and_a_coordinator_going_back(tmp_path):
    s, _, _ = judged(tmp_path, resumes={"aaa": [3]}, bad_round=("ccc", 6))
    assert not s["ok"] and any("round 6: peers disagree" in p for p in s["parity_problems"])
    assert (
        "proj_peer_2 went down but never resumed from its checkpoint in the peer-runs volume" in s["compose_problems"]
    )
    hosts = ["aaa", "bbb", "ccc"]
    run_dir = tmp_path / "again"
    write_run(run_dir, hosts, 8, resumes={"aaa": [3], "bbb": [5]})
    obs = ct.Observed(coord_before=5, coord_after=3)
    logs = {h: "entrypoint: netem: tc qdisc" for h in hosts}
    s = ct.judge(FakeProject(hosts), ct.Plan(peers=3, rounds=8, chaos_actions=2), obs, str(run_dir), logs, CHAOS_LOG)
    assert not s["ok"] and s["rounds_lost"] == 1
    assert "the coordinator came back at committed round 3, before 5" in s["compose_problems"]
    obs = ct.Observed(coord_before=6, coord_after=6)  # the peers must carry on after the restart
    s = ct.judge(FakeProject(hosts), ct.Plan(peers=3, rounds=8, chaos_actions=2), obs, str(run_dir), logs, CHAOS_LOG)
    assert "only 2 rounds committed after the coordinator restart" in s["compose_problems"]
    # chaos that skipped or failed an action is a failure too
    log = CHAOS_LOG + "chaos: [    20.0s] skip action 2: 2 running peer container(s), CHAOS_MIN_ALIVE=2\n"
    acts = ct.chaos_actions(log)
    assert acts[-1]["verb"] == "problem" and "skip action 2" in acts[-1]["line"]


def test_plan_settings_pass_the_roles_checks():
    env = ct.Plan().env("dtrain:test")
    s = chaos_mod.Settings.from_env(env)
    assert s.action == "stop,kill" and s.verbs(0)[0] == "stop" and s.verbs(1)[0] == "kill"
    assert s.max_actions == 4 and s.min_alive == 2
    assert netem.netem_command(env)[6] == "netem" and netem.tbf_command(env)[6] == "tbf"
    args = env["DTRAIN_PEER_ARGS"].split()
    assert f"steps={ct.Plan.max_rounds * ct.Plan.inner_steps}" in args and "checkpoint_every=4" in args
    assert ct.Plan.max_rounds >= 5 * ct.Plan.rounds
    assert 1024 <= int(env["DTRAIN_COORDINATOR_PORT"]) <= 65535


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose binary")
def test_compose_config_takes_the_plan(tmp_path):
    env = {**os.environ, **ct.Plan().env("dtrain:test")}
    p = subprocess.run(
        ["docker-compose", "-f", ct.COMPOSE_FILE, "config"], capture_output=True, text=True, timeout=50, env=env,
        cwd=str(tmp_path),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    import yaml

    svc = yaml.safe_load(p.stdout)["services"]
    assert svc["chaos"]["environment"]["CHAOS_ACTION"] == "stop,kill"
    assert str(svc["chaos"]["environment"]["CHAOS_MAX_ACTIONS"]) == "4" and svc["chaos"]["restart"] == "on-failure"
    assert "outer.sync_every=4" in svc["peer"]["environment"]["DTRAIN_PEER_ARGS"]
    assert svc["peer"]["image"] == "dtrain:test"


# ---------------------------------------------------------------- WAN shaping that degrades honestly

TC_NO_NETEM = """echo "$@" >> "$TC_LOG"
case "$*" in *netem*) echo "Error: Specified qdisc kind is unknown." >&2; exit 2;; esac
exit 0"""
SHAPING = {
    "NETEM": "on",
    "NETEM_DELAY_MS": "40",
    "NETEM_JITTER_MS": "5",
    "NETEM_LOSS_PCT": "1",
    "NETEM_RATE_MBIT": "100",
}


def test_shaping_falls_back_to_tbf_where_the_kernel_has_no_netem(tmp_path, monkeypatch):
    fake_tool(tmp_path, "tc", TC_NO_NETEM)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TC_LOG", str(tmp_path / "tc.log"))
    line = netem.apply(SHAPING)
    assert "\n" not in line
    assert line.startswith("netem: warning: no netem here (exit 2: Error: Specified qdisc kind is unknown.)")
    assert "rate-only shaping of eth0, tbf rate 100mbit burst 125000 latency 200ms" in line
    assert "latency and loss are not emulated (NETEM_DELAY_MS=40, NETEM_JITTER_MS=5, NETEM_LOSS_PCT=1 ignored)" in line
    calls = (tmp_path / "tc.log").read_text().splitlines()
    assert calls == [" ".join(netem.netem_command(SHAPING)[1:]), " ".join(netem.tbf_command(SHAPING)[1:])]
    # a slow link gets a burst of at least 16 KiB
    assert netem.tbf_command({**SHAPING, "NETEM_RATE_MBIT": "1"})[8:12] == ["1mbit", "burst", "16384", "latency"]
    # no rate: nothing tbf could do; the container still runs, with a warning
    line = netem.apply({**SHAPING, "NETEM_RATE_MBIT": "0"})
    assert line.startswith("netem: warning: no shaping at all: netem failed") and "not emulated" in line
    assert netem.tbf_command({**SHAPING, "NETEM": "off"}) is None


def test_shaping_never_stops_the_container(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    # no tc at all
    line = netem.apply(SHAPING)
    assert line.startswith("netem: warning: no shaping at all: 'tc' is not installed (iproute2)")
    # tc without NET_ADMIN: both fail
    fake_tool(tmp_path, "tc", 'echo "RTNETLINK answers: Operation not permitted" >&2; exit 2')
    line = netem.apply(SHAPING)
    assert line.startswith("netem: warning: no shaping at all: netem failed (exit 2: RTNETLINK answers: Operation")
    assert "tbf failed" in line and "cap_add: [NET_ADMIN]" in line
    # a kernel with netem: no warning
    fake_tool(tmp_path, "tc", "exit 0")
    assert netem.apply(SHAPING) == "netem: " + " ".join(netem.netem_command(SHAPING)[3:])


# ---------------------------------------------------------------- the base image script, the Makefile


def test_base_image_script_keeps_an_existing_image_and_refuses_without_debootstrap(tmp_path):
    docker = fake_tool(tmp_path, "docker", 'echo "$@" >> "$DOCKER_LOG"; [ "$1 $2" = "image inspect" ]')
    env = {**os.environ, "DOCKER": docker, "DOCKER_LOG": str(tmp_path / "log")}
    p = subprocess.run(["bash", BASE_IMAGE_SH, "my-base:1"], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 0 and "my-base:1 exists (REBUILD=1 makes it again)" in p.stdout
    assert (tmp_path / "log").read_text().split() == ["image", "inspect", "my-base:1"]
    # REBUILD=1 without debootstrap on PATH (or without root): one line, exit 1, nothing imported
    env.update(REBUILD="1", PATH=f"{tmp_path}:/usr/bin:/bin")
    p = subprocess.run(["bash", BASE_IMAGE_SH, "my-base:1"], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "base-image.sh: error: debootstrap" in p.stderr or "needs root" in p.stderr
    assert "import" not in (tmp_path / "log").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_scripts_pass_shellcheck():
    p = subprocess.run(
        ["shellcheck", BASE_IMAGE_SH, os.path.join(DOCKER, "pip-install.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout


def test_makefile_runs_compose_test_in_acceptance_not_in_test():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        text = f.read()
    targets = {}
    name = None
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line and not line.startswith(("#", ".")) and "=" not in line:
            name = line.split(":", 1)[0]
            targets[name] = [line]
        elif name and line.startswith("\t"):
            targets[name].append(line)
    assert "docker/compose_test.py" in "\n".join(targets["compose-test"])
    assert "compose-test" in "\n".join(targets["acceptance"])
    assert "compose" not in "\n".join(targets["test"])
    assert "compose-test" in text.split(".PHONY:", 1)[1].splitlines()[0]
