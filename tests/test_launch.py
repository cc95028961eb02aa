"""launch/: the torchrun launcher's command lines (DRY_RUN), its resume rule and its SIGTERM hand-off
to torchrun's workers, and the Slurm batch script's leave-and-requeue cycle, run under stand-ins for
srun / scontrol / scancel / torchrun / dtrain-train (no Slurm and no training here).

A real launch of a peer through launch/torchrun.sh (one process, TLS, a coordinator) runs in
tests/test_docker.py (the container's peer role execs it); 2-rank torchrun peers in
tests/test_torchrun.py (launch/torchrun_peer.sh) and tests/test_sim.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO, VENV_BIN, sigint_default

LAUNCH = os.path.join(REPO, "launch", "torchrun.sh")
PEER_SH = os.path.join(REPO, "launch", "torchrun_peer.sh")
SBATCH = os.path.join(REPO, "launch", "slurm", "dtrain-peer.sbatch")
SCRIPTS = [LAUNCH, PEER_SH, SBATCH]

pytestmark = pytest.mark.timeout(60)


def clean_env(**extra) -> dict:
    drop = ("DTRAIN_", "NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_", "SLURM_", "DRY_RUN", "TORCHRUN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(*args, cwd=None, **env):
    return subprocess.run(
        [LAUNCH, *args], capture_output=True, text=True, timeout=30, env=clean_env(**env), cwd=cwd or REPO
    )


def words(p) -> list:
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_scripts_parse_and_pass_shellcheck():
    for s in SCRIPTS:
        assert os.access(s, os.X_OK), s
        p = subprocess.run(["bash", "-n", s], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck)")
    p = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout


def test_dry_run_commands(tmp_path):
    # one node, one rank, no coordinator: plain dtrain-train with the overrides as given
    assert words(launch("--dry-run", "steps=3")) == ["dtrain-train", "steps=3"]
    # a coordinator: DiLoCo, a stable peer id (this host) and run dir; the user's overrides win
    w = words(launch("--dry-run", "--coordinator", "coord.example.org:7070", "outer.codec=int8", DTRAIN_PEER_ID="eu-1"))
    assert w == [
        "dtrain-train",
        "outer=diloco",
        "control.coordinator=coord.example.org:7070",
        "peer_id=eu-1",
        "run_dir=runs/eu-1",
        "outer.codec=int8",
    ]
    host = words(launch(DTRAIN_COORDINATOR="c:1", DRY_RUN=1))
    assert any(a.startswith("peer_id=") and len(a) > len("peer_id=") for a in host)
    w = words(launch("--dry-run", "outer=ddp", "peer_id=mine", DTRAIN_COORDINATOR="c:1", DTRAIN_PEER_ID="env"))
    assert "outer=diloco" not in w and "peer_id=env" not in w and "run_dir=runs/mine" in w
    # data plane, TLS and region from the environment; several ranks: torchrun --standalone
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    w = words(
        launch(
            "--dry-run",
            NPROC_PER_NODE=2,
            DTRAIN_COORDINATOR="c:1",
            DTRAIN_PEER_ID="p",
            DTRAIN_BIND_HOST="0.0.0.0",
            DTRAIN_DATA_PORT=7071,
            DTRAIN_ADVERTISE="peer.example.org",
            DTRAIN_REGION="eu",
            DTRAIN_TLS_CA=ca,
            DTRAIN_TLS_SERVER_NAME="dtrain",
        )
    )
    assert w[:5] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m"]
    for a in (
        "control.host=0.0.0.0",
        "control.port=7071",
        "control.advertise=peer.example.org:7071",
        "control.region=eu",
        f"control.tls.ca={ca}",
        "control.tls.server_name=dtrain",
    ):
        assert a in w, a
    assert not any("TOKEN" in a.upper() for a in w)  # the token stays in the environment
    # a multi-node peer: c10d rendezvous; the rendezvous id follows the peer id
    w = words(
        launch(
            "--dry-run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "4",
            "--rdzv-endpoint",
            "n0:29500",
            "--peer-id",
            "big",
            "--coordinator",
            "c:1",
        )
    )
    assert w[:11] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "n0:29500",
        "--rdzv-id",
        "dtrain-big",
    ]
    w = words(launch("--dry-run", NNODES=2, NODE_RANK=1, RDZV_ENDPOINT="n0:29500", DTRAIN_PEER_ID="big"))
    assert w[w.index("--node-rank") + 1] == "1"
    # torchrun_peer.sh NPROC ...: the short form
    p = subprocess.run(
        [PEER_SH, "2", "--dry-run", "run_dir=x"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert words(p) == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dtrain.cli.train", "run_dir=x"]


def test_restart_on_the_same_run_dir_resumes(tmp_path):
    run = tmp_path / "runs" / "p1"
    args = ("--dry-run", "--coordinator", "c:1", "--peer-id", "p1")
    assert "resume=true" not in words(launch(*args, cwd=tmp_path))
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"")
    p = launch(*args, cwd=tmp_path)
    assert "resume=true" in words(p) and "resuming" in p.stderr
    assert "resume=true" not in words(launch(*args, "resume=false", cwd=tmp_path))  # the user decides
    assert "resume=true" in words(launch("--dry-run", f"run_dir={run}"))


@pytest.mark.parametrize(
    "env,args,msg",
    [
        ({"NPROC_PER_NODE": "two"}, [], "NPROC_PER_NODE='two' is not allowed: a positive integer"),
        ({"NNODES": "0"}, [], "NNODES='0' is not allowed: a positive integer"),
        (
            {"NNODES": "2", "NODE_RANK": "2", "DTRAIN_PEER_ID": "p", "RDZV_ENDPOINT": "h:1"},
            [],
            "NODE_RANK='2' is not allowed: an integer in 0..1",
        ),
        ({"NNODES": "2", "DTRAIN_COORDINATOR": "c:1"}, [], "DTRAIN_PEER_ID='' is not allowed for a 2-node peer"),
        ({"NNODES": "2", "DTRAIN_PEER_ID": "p"}, [], "RDZV_ENDPOINT='' is not allowed for a 2-node peer"),
        ({"DTRAIN_COORDINATOR": "nohost"}, [], "DTRAIN_COORDINATOR='nohost' is not allowed: host:port"),
        ({"DTRAIN_DATA_PORT": "99999"}, [], "DTRAIN_DATA_PORT='99999' is not allowed: a port number 0..65535"),
        ({"DTRAIN_ADVERTISE": "h"}, [], "DTRAIN_ADVERTISE='h' is not allowed without a port"),
        ({"DTRAIN_TLS_CA": "/no/such.pem"}, [], "DTRAIN_TLS_CA='/no/such.pem' is not allowed: not a readable file"),
        ({"DTRAIN_PEER_ID": "a b"}, ["--coordinator", "c:1"], "DTRAIN_PEER_ID='a b' is not allowed"),
        ({}, ["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_bad_values_are_refused(env, args, msg):
    p = launch("--dry-run", *args, **env)
    assert p.returncode == 2 and p.stdout == ""
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ---------------------------------------------------------------- stand-ins for the tools around the scripts

FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# stand-in for torchrun: 2 workers (LOCAL_RANK 0 and 1) that leave on SIGTERM; the agent exits 0 once they have (all
# give up after 30 s); like torchrun, a signalled agent stops its workers and exits non-zero.
# FAKE_GATE: the agent starts worker2 only once that file exists (meanwhile its only other child is a sleep)
echo $$ > "$FAKE_DIR/agent.pid"
echo "$@" > "$FAKE_DIR/agent.args"
trap 'echo agent >> "$FAKE_DIR/termed"; kill -TERM $(jobs -p) 2>/dev/null; exit 1' TERM INT
for i in 1 2; do
  if [[ $i == 2 && -n ${FAKE_GATE:-} ]]; then
    end=$((SECONDS + 30)); while [[ ! -e $FAKE_GATE && $SECONDS -lt $end ]]; do sleep 0.05; done
  fi
  LOCAL_RANK=$((i - 1)) bash -c 'trap "echo worker$0 >> \"$FAKE_DIR/termed\"; exit 0" TERM
           echo $$ > "$FAKE_DIR/worker$0.pid"
           end=$((SECONDS + 30)); while [[ $SECONDS -lt $end ]]; do sleep 0.05; done' "$i" &
done
wait
"""

FAKE_TRAIN = r"""#!/usr/bin/env bash
# stand-in for dtrain-train: records its overrides; SIGTERM = leave, checkpoint, exit 0
run_dir=
for a in "$@"; do echo "$a" >> "$FAKE_DIR/train.args"; [[ $a == run_dir=* ]] && run_dir=${a#run_dir=}; done
leave() { mkdir -p "$run_dir/checkpoints"; : > "$run_dir/checkpoints/latest.pt"; echo left >> "$FAKE_DIR/train.log"; }
trap 'leave; exit 0' TERM
echo started >> "$FAKE_DIR/train.log"
end=$((SECONDS + ${FAKE_TRAIN_S:-0}))
while [[ $SECONDS -lt $end ]]; do sleep 0.05; done
exit "${FAKE_EXIT:-0}"
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do echo "$1" >> "$FAKE_DIR/srun.opts"; shift; done
"$@" &
echo $! > "$FAKE_DIR/task.pid"
wait $!
"""

FAKE_SCANCEL = r"""#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scancel.log"
kill -TERM "$(cat "$FAKE_DIR/task.pid")"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case $1 in
  show) printf 'node1\nnode2\n' ;;
  requeue) echo "requeue $2" >> "$FAKE_DIR/scontrol.log" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fakes(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    for name, body in [
        ("torchrun", FAKE_TORCHRUN),
        ("dtrain-train", FAKE_TRAIN),
        ("srun", FAKE_SRUN),
        ("scancel", FAKE_SCANCEL),
        ("scontrol", FAKE_SCONTROL),
    ]:
        (d / name).write_text(body)
        (d / name).chmod(0o755)
    yield d
    # a torchrun agent runs in a session of its own: nothing of it outlives the test, whatever the test did
    for name in ("agent.pid", "worker1.pid", "worker2.pid"):
        kill_if_ours(d, d / name)


def read(path) -> str:
    return path.read_text() if path.exists() else ""


def wait_file(path, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def start(argv, env) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=sigint_default,
    )


def finish(p, timeout=20.0):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its session: the stand-ins it started too
            p.wait()
        # not communicate(): a torchrun agent (a session of its own) that outlived the script would hold the
        # pipes open until its workers give up, past the test's timeout
        p.stdout.close()
        p.stderr.close()
    return p.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_reaches_the_workers_not_the_agent(fakes, tmp_path, sig):
    p = start([LAUNCH, "run_dir=x"], clean_env(NPROC_PER_NODE=2, TORCHRUN=fakes / "torchrun", FAKE_DIR=fakes))
    try:
        for i in (1, 2):
            wait_file(fakes / f"worker{i}.pid")
        time.sleep(0.1)  # the workers' traps are set before they write their pid
        os.kill(p.pid, sig)
    finally:
        rc, out, err = finish(p)
    assert rc == 0, err
    assert sorted(read(fakes / "termed").split()) == ["worker1", "worker2"]  # the agent was left alone
    assert read(fakes / "agent.args").split()[:4] == ["--standalone", "--nproc-per-node", "2", "-m"]
    assert "asking the workers to leave" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_agent_starts_leaves_no_orphan(fakes, tmp_path, sig):
    # the traps are set before the agent starts: a signal in that window must not kill the script and
    # leave the agent (a session of its own) running; whenever it comes, everything ends promptly
    for delay in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        for name in ("agent.pid", "worker1.pid", "worker2.pid", "termed"):
            (fakes / name).unlink(missing_ok=True)
        p = start([LAUNCH, "run_dir=x"], clean_env(NPROC_PER_NODE=2, TORCHRUN=fakes / "torchrun", FAKE_DIR=fakes))
        try:
            time.sleep(delay)
            os.kill(p.pid, sig)
            try:
                rc, out, err = finish(p, timeout=15)  # TimeoutExpired: the agent kept the pipes open
            except subprocess.TimeoutExpired as e:
                raise AssertionError(
                    f"delay {delay}: the script did not end; stopped: {read(fakes / 'termed')!r}, stderr: {e.stderr!r}"
                ) from None
            agent = fakes / "agent.pid"
            deadline = time.monotonic() + 10
            while _our_pid(fakes, agent) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _our_pid(fakes, agent) is None, f"agent outlived the script (delay {delay})"
        finally:
            for name in ("agent.pid", "worker1.pid", "worker2.pid"):
                kill_if_ours(fakes, fakes / name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_all_workers_started_stops_the_agent(fakes, tmp_path, sig):
    # 1 of the 2 workers is up (the agent holds the other back): asking only that one to leave would leave
    # the agent (and the script) waiting on the other; the agent is stopped instead, and it stops worker1
    p = start(
        [LAUNCH, "run_dir=x"],
        clean_env(NPROC_PER_NODE=2, TORCHRUN=fakes / "torchrun", FAKE_DIR=fakes, FAKE_GATE=fakes / "gate"),
    )
    try:
        wait_file(fakes / "worker1.pid")
        time.sleep(0.1)  # worker1's trap is set before it writes its pid
        os.kill(p.pid, sig)
    finally:
        rc, out, err = finish(p)
    assert rc != 0 and "1 of 2 workers started: stopping the torchrun agent" in err, err
    assert sorted(read(fakes / "termed").split()) == ["agent", "worker1"]
    assert not (fakes / "worker2.pid").exists()


def test_no_child_is_waited_for_before_the_agent_starts(tmp_path):
    # bash drops a SIGINT sent to the script alone while it waits for a child that then exits normally (a
    # $(...), a pipeline, an external command: it takes the child to have handled it), trap or no trap; the
    # agent would then be started and never stopped. So up to the agent's start the script runs no such
    # child: no command substitution in its trace (++), and no command but setsid on its PATH
    if shutil.which("setsid") is None:
        pytest.skip("no setsid here: the launcher starts the agent without it")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "setsid").symlink_to(shutil.which("setsid"))
    env = clean_env(
        NPROC_PER_NODE=2,
        TORCHRUN=shutil.which("true"),
        DTRAIN_COORDINATOR="c:1",
        DTRAIN_PEER_ID="p",
        DTRAIN_DATA_PORT=7071,
        DTRAIN_ADVERTISE="h",
        DTRAIN_REGION="eu",
    )
    env["PATH"] = str(bin_dir)
    p = subprocess.run(
        [shutil.which("bash"), "-x", LAUNCH, "steps=1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0 and "\n+ setsid " in p.stderr, p.stderr
    trace = "\n" + p.stderr.split("\n+ setsid ")[0]
    assert "\n++" not in trace and "not found" not in trace, trace


def _our_pid(fakes, pid_file):
    """The PID in ``pid_file`` if that process still runs and is one of our stand-ins (its environment
    names ``fakes``; a zombie does not count), else None."""
    try:
        pid = int(read(pid_file))
        with open(f"/proc/{pid}/environ", "rb") as f:
            ours = f"FAKE_DIR={fakes}".encode() in f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            running = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        return pid if ours and running else None
    except (OSError, ValueError):
        return None


def kill_if_ours(fakes, pid_file) -> None:
    """SIGKILL the stand-in whose PID is in ``pid_file`` if it still runs."""
    pid = _our_pid(fakes, pid_file)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def slurm_env(fakes, tmp_path, **extra):
    env = dict(
        SLURM_JOB_ID=42,
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_NUM_NODES=1,
        SLURM_SUBMIT_DIR=REPO,
        DTRAIN_COORDINATOR="coord.example.org:7070",
        DTRAIN_RUNS=tmp_path / "runs",
        SRUN=fakes / "srun",
        SCONTROL=fakes / "scontrol",
        SCANCEL=fakes / "scancel",
        DTRAIN_TRAIN=fakes / "dtrain-train",
        FAKE_DIR=fakes,
    )
    return clean_env(**{**env, **extra})


def test_slurm_peer_leaves_on_warning_requeues_and_resumes(fakes, tmp_path):
    run_dir = tmp_path / "runs" / "slurm-42"
    # first allocation: training, then Slurm's warning (SIGTERM to the batch shell)
    p = start(["bash", SBATCH, "sandwich.num_random=1"], slurm_env(fakes, tmp_path, FAKE_TRAIN_S=60))
    try:
        wait_file(fakes / "train.log")
        time.sleep(0.1)
        os.kill(p.pid, signal.SIGTERM)
    finally:
        rc, out, err = finish(p)
    assert rc == 0, err
    args = read(fakes / "train.args").split()
    for a in (
        "outer=diloco",
        "control.coordinator=coord.example.org:7070",
        "peer_id=slurm-42",
        f"run_dir={run_dir}",
        "control.host=0.0.0.0",
        "control.port=7071",
        "sandwich.num_random=1",
    ):
        assert a in args, a
    adv = [a for a in args if a.startswith("control.advertise=")]
    assert len(adv) == 1 and adv[0].endswith(":7071") and len(adv[0]) > len("control.advertise=:7071")
    assert "resume=true" not in args
    assert read(fakes / "scancel.log").split() == ["--signal=TERM", "42"]  # the step's tasks, not srun
    assert read(fakes / "train.log").split() == ["started", "left"]
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert read(fakes / "scontrol.log").split() == ["requeue", "42"]

    # the requeued job (same id): same peer and run dir, resumes, trains to the end, is not requeued again
    (fakes / "train.args").unlink()
    rc, out, err = finish(start(["bash", SBATCH], slurm_env(fakes, tmp_path, SLURM_RESTART_COUNT=1)))
    assert rc == 0, err
    args = read(fakes / "train.args").split()
    assert "resume=true" in args and "peer_id=slurm-42" in args and f"run_dir={run_dir}" in args
    assert read(fakes / "scontrol.log").split() == ["requeue", "42"]

    # a peer that fails is not requeued by the script: its status is the job's
    rc, out, err = finish(start(["bash", SBATCH], slurm_env(fakes, tmp_path, FAKE_EXIT=3)))
    assert rc == 3 and "exited with status 3" in err
    assert read(fakes / "scontrol.log").split() == ["requeue", "42"]


def test_slurm_multi_node_command_and_refusals(fakes, tmp_path):
    env = slurm_env(fakes, tmp_path, SLURM_JOB_NUM_NODES=2, NPROC_PER_NODE=4, DRY_RUN=1, SLURM_RESTART_COUNT=3)
    rc, out, err = finish(start(["bash", SBATCH], env))
    assert rc == 0, err
    w = out.split()
    assert w[:11] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node1:29500",
        "--rdzv-id",
        "dtrain-42-3",
    ]
    assert "peer_id=slurm-42" in w and "--ntasks-per-node=1" in read(fakes / "srun.opts")

    env.pop("DTRAIN_COORDINATOR")
    rc, out, err = finish(start(["bash", SBATCH], env))
    assert rc == 2 and "DTRAIN_COORDINATOR='' is not allowed: host:port of the coordinator" in err
    env = clean_env(DTRAIN_COORDINATOR="c:1")
    rc, out, err = finish(start(["bash", SBATCH], env))
    assert rc != 0 and "SLURM_JOB_ID is not set: submit this script with sbatch" in err
