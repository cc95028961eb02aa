"""DiLoCo and the ddp baseline with real training peers (dtrain-train processes and a
torchrun job) around a real coordinator: every committed round has one state hash on
every peer, and the round records carry their fields."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fault_plugin
from conftest import FAST_MBV3, REPO

pytestmark = pytest.mark.timeout(300)

COMMON = [
    *FAST_MBV3,
    "batch_size=16",
    "calib_batches=2",
    "calib_batch_size=16",
    "eval_every=0",
    "checkpoint_every=0",
    "logger.progress=off",
    "threads=1",
]
ROUND_FIELDS = {
    "kind",
    "round",
    "quorum_id",
    "quorum_size",
    "members",
    "state_hash",
    "bytes_sent",
    "bytes_recv",
    "round_s",
    "compute_s",
    "comm_s",
    "wait_s",
    "codec",
}


@pytest.fixture
def cluster(tmp_path):
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def coordinator(*args, name="coord"):
        out = open(tmp_path / f"{name}.out", "w")
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dtrain.cli.coordinator",
                f"state_dir={tmp_path / name}",
                "port=0",
                "grace_s=1",
                "lease_timeout_s=10",
                *args,
            ],
            stdout=out,
            stderr=open(tmp_path / f"{name}.err", "w"),
            cwd=REPO,
            env=env,
        )
        procs.append(p)
        deadline = time.time() + 60
        while time.time() < deadline:
            line = open(tmp_path / f"{name}.out").readline()
            if line.endswith("\n"):
                return line.split()[-1]
            assert p.poll() is None, open(tmp_path / f"{name}.err").read()
            time.sleep(0.1)
        raise AssertionError("coordinator did not start")

    def peer(name, address, *overrides, nproc=1, extra_env=None):
        cmd = [
            sys.executable,
            "-m",
            "dtrain.cli.train",
            f"run_dir={tmp_path / name}",
            f"peer_id={name}",
            f"control.coordinator={address}",
            *COMMON,
            *overrides,
        ]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
        p = subprocess.Popen(
            cmd,
            stdout=open(tmp_path / f"{name}.log", "a"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**env, **(extra_env or {})},
        )
        procs.append(p)
        return p

    try:
        yield tmp_path, coordinator, peer
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def _finish(tmp_path, peers, timeout=240):
    for name, p in peers.items():
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"{name} exited {rc}:\n" + open(tmp_path / f"{name}.log").read()[-4000:]


def _rounds(tmp_path, names):
    out = {}
    for name in names:
        recs = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        out[name] = {r["round"]: r for r in recs if r["kind"] == "round"}
    return out


def _assert_parity(rounds):
    seen = {}
    for rs in rounds.values():
        for r, rec in rs.items():
            assert ROUND_FIELDS <= set(rec), set(ROUND_FIELDS) - set(rec)
            seen.setdefault(r, set()).add(rec["state_hash"])
    assert seen, "no round was committed"
    bad = {r: h for r, h in seen.items() if len(h) > 1}
    assert not bad, f"rounds with different state hashes: {bad}"
    return seen


def test_mixed_world_sizes_with_overlap_on_gloo(cluster):
    """A 2-rank torchrun peer and a 1-rank peer; gloo outer collective; tau = 1."""
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=2", "gloo_store=true")
    args = [
        "outer=diloco",
        "outer.backend=gloo",
        "outer.codec=int8",
        "outer.sync_every=4",
        "outer.overlap_steps=1",
        "steps=12",
    ]
    peers = {"two": peer("two", address, *args, nproc=2), "one": peer("one", address, *args)}
    _finish(tmp_path, peers)
    rounds = _rounds(tmp_path, peers)
    seen = _assert_parity(rounds)
    assert len(seen) == 3
    assert all(set(r["members"]) == {"one", "two"} for r in rounds["one"].values())
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    # the run's result is the global model: both peers evaluate the same parameters
    r1 = json.load(open(tmp_path / "one" / "summary.json"))["results"]
    r2 = summary["results"]
    assert r1["max"]["test_acc"] == r2["max"]["test_acc"]


def test_streaming_int4_error_feedback_three_peers(cluster):
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=3")
    args = ["outer=streaming", "outer.sync_every=8", "outer.fragments=4", "outer.overlap_steps=1", "steps=16"]
    peers = {f"p{i}": peer(f"p{i}", address, *args) for i in range(3)}
    _finish(tmp_path, peers)
    rounds = _rounds(tmp_path, peers)
    seen = _assert_parity(rounds)
    assert len(seen) == 8  # a round every 2 steps, the last applied at the end
    rec = rounds["p0"][0]
    assert rec["codec"] == "int4" and rec["quorum_size"] == 3 and rec["bytes_sent"] > 0


def test_ddp_baseline_two_peers(cluster):
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=2")
    peers = {f"d{i}": peer(f"d{i}", address, "outer=ddp", "steps=6") for i in range(2)}
    _finish(tmp_path, peers)
    rounds = _rounds(tmp_path, peers)
    seen = _assert_parity(rounds)
    assert len(seen) == 6  # one round per inner step
    # fp32 gradients: each member sends (k-1)/k of N values in each of the two phases
    from dtrain.supernet import build_supernet

    from conftest import compose

    n = sum(p.numel() for p in build_supernet(compose(["run_dir=/tmp/x", *FAST_MBV3]).model).parameters())
    sent = rounds["d0"][1]["bytes_sent"]
    assert 4 * n <= sent <= 4 * n * 1.02  # 2 (k-1)/k N 4 bytes with k = 2, plus framing


def test_sigterm_while_waiting_for_a_quorum_leaves_at_once(cluster):
    """A peer blocked in Sync (its partner never comes) abandons the wait on SIGTERM, leaves and exits 0:
    a DiLoCo peer and a ddp peer (each with its own coordinator), side by side."""
    tmp_path, coordinator, peer = cluster
    procs = {}
    for outer in ("diloco", "ddp"):
        address = coordinator("min_peers=2", "grace_s=0.5", name=f"coord-{outer}")
        procs[outer] = peer(f"lonely-{outer}", address, f"outer={outer}", "outer.sync_every=2", "steps=8")
    logs = {o: tmp_path / f"lonely-{o}.log" for o in procs}
    deadline = time.time() + 120
    while not all("joined" in logs[o].read_text() for o in procs) and time.time() < deadline:
        for o, p in procs.items():
            assert p.poll() is None, logs[o].read_text()[-2000:]
        time.sleep(0.2)
    time.sleep(1.0)  # at their first round boundary (2 tiny steps), waiting for a quorum of 2
    t0 = time.time()
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for o, p in procs.items():
        assert p.wait(30) == 0, logs[o].read_text()[-3000:]
        log = logs[o].read_text()
        assert "abandoned the wait for a quorum" in log and "left the run" in log, o
        events = [json.loads(line) for line in open(tmp_path / f"coord-{o}" / "events.jsonl")]
        assert any(e["event"] == "leave" and e.get("peer_id") == f"lonely-{o}" for e in events), o
    assert time.time() - t0 < 15  # Sync calls are held at most 5 s at a time


def test_round_committed_just_before_its_only_member_dies_is_not_lost(cluster):
    """Durable commit: the sole member of a quorum crashes right after round 1 commits, before it applies,
    records or checkpoints it. S_2 was written before its vote, so the restarted peer continues from S_2
    instead of waiting forever for a donor that does not exist."""
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=1", "grace_s=0.2")
    args = ("outer=diloco", "outer.sync_every=2", "steps=8")
    p = peer(
        "solo",
        address,
        *args,
        extra_env={"DTRAIN_FAULT_PLUGIN": fault_plugin.PLUGIN, "DTRAIN_FAULT_EXIT_AFTER_COMMIT": "1"},
    )
    assert p.wait(120) == 137, (tmp_path / "solo.log").read_text()[-3000:]
    state = json.load(open(tmp_path / "coord" / "state.json"))
    assert state["committed_round"] == 2
    rounds = [r["round"] for r in _records(tmp_path / "solo", "round")]
    assert rounds == [0]  # round 1 committed but was never recorded by anyone
    p = peer("solo", address, *args, "resume=true")
    assert p.wait(120) == 0, (tmp_path / "solo.log").read_text()[-3000:]
    heals = _records(tmp_path / "solo", "heal")
    assert [h["round"] for h in heals] == [2] and "before the vote" in heals[0]["reason"]
    assert [r["round"] for r in _records(tmp_path / "solo", "round")] == [0, 2, 3]
    assert json.load(open(tmp_path / "coord" / "state.json"))["committed_round"] == 4
    # the state it recovered is the one the coordinator committed round 2 from
    commits = {
        e["round"]: e for e in map(json.loads, open(tmp_path / "coord" / "events.jsonl")) if e["event"] == "commit"
    }
    assert commits[2]["state_hash"] == heals[0]["state_hash"]


def _records(run_dir, kind):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if json.loads(line)["kind"] == kind]


def test_balanced_rounds_with_a_slow_peer_keep_parity_and_lose_no_step(cluster):
    """Two peers, one emulating a machine at half speed, balanced rounds: from round 1 on the slow peer is
    assigned fewer steps (recorded identically by both), the mean weights each by the samples it trained,
    every round has one state hash on both, nobody heals and no trained step is lost."""
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=2")
    args = ["outer=diloco", "outer.sync_every=12", "outer.local_steps=balanced", "steps=72"]
    peers = {"fast": peer("fast", address, *args), "slow": peer("slow", address, *args, "emulated_speed=0.5")}
    _finish(tmp_path, peers)
    fast, slow = (_records(tmp_path / name, "round") for name in ("fast", "slow"))
    assert [r["round"] for r in fast] == [r["round"] for r in slow] == list(range(6))
    assert [r["state_hash"] for r in fast] == [r["state_hash"] for r in slow]
    assert [r["local_steps"] for r in fast] == [r["local_steps"] for r in slow]
    assert fast[0]["local_steps"] == {"fast": 2, "slow": 2}  # no rates measured yet: a short probe round
    # round 1 is assigned from one measured step (a process's first step does not count)
    for r in fast[2:]:  # measured on a shared machine: fewer than the fast peer, at least one
        assert r["local_steps"]["fast"] == 12 and 1 <= r["local_steps"]["slow"] <= 11, r["local_steps"]
        by_peer = dict(zip(r["members"], r["weights"]))
        assert by_peer["fast"] * r["local_steps"]["slow"] == by_peer["slow"] * 12  # samples (same batch)
    assert sum(r["local_steps"]["slow"] for r in fast[2:]) <= 0.8 * 12 * len(fast[2:])
    for recs, name in ((fast, "fast"), (slow, "slow")):
        assert [r["steps"] for r in recs] == [r["local_steps"][name] for r in recs]
        assert sum(r["steps_lost"] for r in recs) == 0 and not any(r["sat_out"] for r in recs)
        assert not _records(tmp_path / name, "heal")
    for name in peers:  # the schedules follow the rounds: both end at the last step
        assert json.load(open(tmp_path / name / "summary.json"))["step"] == 72


def test_peers_of_three_capacities_keep_parity_and_send_their_slice(cluster):
    """A full peer and two capped ones (parameter budgets near 60 % and 40 % of the largest subnet): every round
    has one state hash on all three, each capped peer trains and sends only its top arch's slice (its round
    bytes follow its slice fraction), and the run records say what each holds and trains."""
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=3")
    args = ["outer=diloco", "outer.sync_every=4", "steps=16"]
    peers = {
        "full": peer("full", address, *args),
        "mid": peer("mid", address, *args, "capacity.max_params=7000"),
        "small": peer("small", address, *args, "capacity.max_params=5000"),
    }
    _finish(tmp_path, peers)
    rounds = {name: _records(tmp_path / name, "round") for name in peers}
    assert [r["round"] for r in rounds["full"]] == list(range(4))
    assert len({tuple(r["state_hash"] for r in recs) for recs in rounds.values()}) == 1
    runs = {name: _records(tmp_path / name, "run")[0] for name in peers}
    assert runs["full"]["top_arch"] is None and runs["full"]["slice_fraction"] == 1.0
    assert 0 < runs["small"]["slice_fraction"] < runs["mid"]["slice_fraction"] < 1.0
    for name in ("mid", "small"):
        run = runs[name]
        assert run["params_trained"] < run["params_held"] and run["top_arch"]
        sent = sum(r["bytes_sent"] for r in rounds[name]) / sum(r["bytes_sent"] for r in rounds["full"])
        assert sent <= run["slice_fraction"] + 0.05, (name, sent, run["slice_fraction"])
        assert all(r["slice_fraction"] == run["slice_fraction"] for r in rounds[name])


def test_auto_capacity_steps_a_slow_peer_down_the_ladder(cluster):
    """capacity=auto with balanced rounds: a peer too slow for outer.min_local_steps of its full sandwich picks a
    smaller top arch instead of sitting rounds out; its choice is in its round records, the coordinator hears
    its new slice, and every round keeps one state hash on both peers."""
    tmp_path, coordinator, peer = cluster
    address = coordinator("min_peers=2")
    args = ["outer=diloco", "outer.sync_every=8", "outer.local_steps=balanced", "outer.min_local_steps=3", "steps=24"]
    peers = {
        "fast": peer("fast", address, *args),
        "slow": peer("slow", address, *args, "capacity=auto", "emulated_speed=0.2"),
    }
    _finish(tmp_path, peers)
    fast, slow = (_records(tmp_path / name, "round") for name in ("fast", "slow"))
    assert [r["state_hash"] for r in fast] == [r["state_hash"] for r in slow] and len(fast) == 3
    levels = [r["next_capacity_level"] for r in slow]
    assert max(levels) >= 1, levels  # it stepped down at least once
    first_down = next(i for i, level in enumerate(levels) if level >= 1)
    assert first_down < 2 and slow[first_down + 1]["slice_fraction"] < 1.0
    assert all(r["capacity_level"] == 0 and r["next_capacity_level"] == 0 for r in fast)
