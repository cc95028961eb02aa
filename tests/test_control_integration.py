"""Integration tests of the control plane: a real coordinator process and model-free peers without a data
plane (``dtrain.sim.model_free_peer --backends none``, see ``control_fixtures``) on 127.0.0.1.

Checks the invariants of DESIGN.md under churn: parity of state hashes,
liveness when peers die / stop / leave, nothing lost across a coordinator
restart, joiners healing from donors, and refusals that do not disturb a run.
"""

from __future__ import annotations

import signal
import time

import pytest

from control_fixtures import FAST, STATE_BYTES, check_chain, check_parity, wait_for


def _stop_all(cl, peers, timeout=10.0):
    for p in peers:
        p.signal(signal.SIGTERM)
    assert cl.wait_exit(peers, timeout) == [0] * len(peers), [p.stderr()[-500:] for p in peers]


def _rounds_after(peer, t):
    return [r for r in peer.records("round") if r["time"] > t]


@pytest.mark.timeout(60)
def test_three_peers_ten_rounds_with_parity(cluster):
    c = cluster.start_coordinator(min_peers=3)
    peers = [cluster.start_peer(f"p{i}", 10) for i in range(3)]
    assert cluster.wait_exit(peers, 30) == [0, 0, 0], [p.stderr() for p in peers]
    for p in peers:
        assert sorted(p.hashes()) == list(range(10)), p.peer_id
        assert [r["kind"] for r in p.records()][-1] == "leave"
        check_chain(p)
    ref = check_parity(peers)
    assert len(ref) == 10
    assert c.committed_round() >= 10
    commits = c.events("commit")
    assert sorted(e["round"] for e in commits) == list(range(10))  # each round committed once
    before = {r["round"]: r["state_hash_before"] for r in peers[0].records("round")}
    assert all(e["state_hash"] == before[e["round"]] for e in commits)
    assert all(sorted(e["members"]) == ["p0", "p1", "p2"] for e in commits)


@pytest.mark.timeout(60)
def test_sigkilled_peer_is_expired_and_survivors_keep_committing(cluster):
    c = cluster.start_coordinator(min_peers=2)
    p0, p1, p2 = peers = [cluster.start_peer(f"p{i}", 1000) for i in range(3)]
    wait_for(lambda: all(len(p.records("round")) >= 3 for p in peers), 20, "3 rounds on every peer")
    p2.signal(signal.SIGKILL)
    t_kill, r_kill = time.time(), c.committed_round()
    wait_for(lambda: c.events("expire", peer_id="p2"), 10, "p2's lease to expire")
    wait_for(lambda: all(len(_rounds_after(p, t_kill)) >= 5 for p in (p0, p1)), 20, "5 more rounds on survivors")
    _stop_all(cluster, [p0, p1])
    check_parity(peers)
    for p in (p0, p1):
        check_chain(p)
    retries = [e["round"] for e in c.events("retry") if e["round"] >= r_kill]
    assert all(retries.count(r) <= 1 for r in retries), retries  # the round in flight: at most one retry
    commits = [e for e in c.events("commit") if e["time"] >= t_kill - 0.5]
    gaps = [b["time"] - a["time"] for a, b in zip(commits, commits[1:])]
    assert max(gaps) < FAST["lease_timeout_s"] + 2.0, gaps  # held up by at most a lease and a retry
    assert all("p2" not in e["members"] for e in c.events("commit") if e["time"] > t_kill + 0.1)


@pytest.mark.timeout(60)
def test_stopped_peer_rejoins_heals_and_continues(cluster):
    c = cluster.start_coordinator(min_peers=2)
    p0, p1, p2 = peers = [cluster.start_peer(f"p{i}", 1000) for i in range(3)]
    wait_for(lambda: all(len(p.records("round")) >= 3 for p in peers), 20, "3 rounds on every peer")
    p2.signal(signal.SIGSTOP)
    t_stop = time.time()
    wait_for(lambda: c.events("expire", peer_id="p2"), 10, "p2's lease to expire while stopped")
    wait_for(lambda: len(_rounds_after(p0, t_stop)) >= 2, 10, "survivors to commit while p2 is stopped")
    p2.signal(signal.SIGCONT)
    heal = wait_for(lambda: [h for h in p2.records("heal") if h["time"] > t_stop], 15, "p2 to heal")[0]
    assert heal["donor"] in ("p0", "p1")
    wait_for(lambda: len(_rounds_after(p2, heal["time"])) >= 3, 15, "p2 to commit again")
    _stop_all(cluster, peers)
    check_parity(peers)
    check_chain(p2)
    assert len(c.events("join", peer_id="p2")) >= 2  # it re-joined by itself
    late = [e for e in c.events("commit") if e["time"] > heal["time"]]
    assert any("p2" in e["members"] for e in late)


@pytest.mark.timeout(60)
def test_joiner_heals_from_a_donor_then_commits_with_parity(cluster):
    c = cluster.start_coordinator(min_peers=2)
    peers = [cluster.start_peer(f"p{i}", 40) for i in range(3)]
    wait_for(lambda: c.committed_round() >= 5, 20, "5 committed rounds")
    joiner = cluster.start_peer("late", 40, "--transfer-chunk-bytes", "4096")  # 64 KiB state: 16-chunk transfers
    codes = cluster.wait_exit(peers + [joiner], 40)
    assert codes == [0, 0, 0, 0], [p.stderr()[-500:] for p in peers + [joiner]]
    heals = joiner.records("heal")
    assert heals and heals[0]["round"] >= 5 and heals[0]["donor"] in ("p0", "p1", "p2")
    assert len(heals) <= 3, heals  # it enters the run instead of chasing it
    assert heals[0]["bytes"] == STATE_BYTES == 65536
    check_parity(peers + [joiner])
    check_chain(joiner)
    after = joiner.hashes()
    assert len(after) >= 3 and max(after) == 39
    assert any("late" in e["members"] for e in c.events("commit"))


@pytest.mark.timeout(60)
def test_coordinator_restart_loses_nothing_and_peers_reconnect(cluster):
    c = cluster.start_coordinator(min_peers=2)
    peers = [cluster.start_peer(f"p{i}", 1000) for i in range(3)]
    wait_for(lambda: c.committed_round() >= 5, 20, "5 committed rounds")
    c.signal(signal.SIGKILL)
    c.wait(5)
    before = c.state()
    t_kill = time.time()
    time.sleep(0.3)  # peers notice: their calls fail with UNAVAILABLE
    c2 = cluster.start_coordinator(port=c.port, min_peers=2)
    assert c2.address == c.address
    assert c2.committed_round() >= before["committed_round"]
    wait_for(lambda: c2.committed_round() >= before["committed_round"] + 5, 30, "5 rounds after the restart")
    wait_for(lambda: all(_rounds_after(p, t_kill) for p in peers), 15, "every peer to commit after the restart")
    _stop_all(cluster, peers)
    after = c2.state()
    assert after["committed_round"] >= before["committed_round"] + 5
    old = {(h["round"], h["quorum_id"]) for h in before["history"]}
    assert old <= {(h["round"], h["quorum_id"]) for h in after["history"]}  # no committed round undone
    assert len({h["round"] for h in after["history"]}) == len(after["history"])  # none committed twice
    ref = check_parity(peers)  # no round number with two hashes
    for p in peers:
        check_chain(p)
    assert max(ref) >= before["committed_round"]
    rejoined = {e["peer_id"] for e in c2.events("join") if e["time"] > t_kill}
    assert rejoined == {"p0", "p1", "p2"}


@pytest.mark.timeout(60)
def test_sigterm_leaves_gracefully(cluster):
    c = cluster.start_coordinator(min_peers=2)
    p0, p1, p2 = peers = [cluster.start_peer(f"p{i}", 1000) for i in range(3)]
    wait_for(lambda: all(len(p.records("round")) >= 3 for p in peers), 20, "3 rounds on every peer")
    p2.signal(signal.SIGTERM)
    assert cluster.wait_exit([p2], 8) == [0], p2.stderr()
    assert p2.records()[-1]["kind"] == "leave"
    leave = wait_for(lambda: c.events("leave", peer_id="p2"), 5, "p2's leave event")[0]
    nxt = wait_for(lambda: [e for e in c.events("commit") if e["time"] > leave["time"]], 10, "a commit after")[0]
    assert nxt["time"] - leave["time"] < FAST["lease_timeout_s"], "the next quorum waited for the lease"
    assert "p2" not in nxt["members"]
    wait_for(lambda: len(_rounds_after(p0, leave["time"])) >= 3, 10, "3 more rounds")
    _stop_all(cluster, [p0, p1])
    assert not c.events("expire")
    check_parity(peers)


@pytest.mark.timeout(60)
def test_failed_vote_retries_with_a_new_quorum_id(cluster):
    c = cluster.start_coordinator(min_peers=3)
    peers = [
        cluster.start_peer("p0", 6),
        cluster.start_peer("p1", 6, "--fail-commit-at", "3"),
        cluster.start_peer("p2", 6),
    ]
    assert cluster.wait_exit(peers, 30) == [0, 0, 0], [p.stderr() for p in peers]
    retries = c.events("retry")
    assert [e["round"] for e in retries] == [3], retries
    assert "p1" in retries[0]["reason"] and "not ok" in retries[0]["reason"]
    commit3 = c.events("commit", round=3)
    assert len(commit3) == 1 and commit3[0]["quorum_id"] > retries[0]["quorum_id"]
    for p in peers:
        assert [(r["round"], r["quorum_id"]) for r in p.records("retry")] == [(3, retries[0]["quorum_id"])]
        assert sorted(p.hashes()) == list(range(6))
    check_parity(peers)


@pytest.mark.timeout(60)
def test_other_schema_is_refused_without_disturbing_the_run(cluster):
    c = cluster.start_coordinator(min_peers=3)
    peers = [cluster.start_peer(f"p{i}", 8) for i in range(3)]
    wait_for(lambda: len(c.events("join")) >= 3, 15, "3 joins")
    intruder = cluster.start_peer("x", 8, "--schema", "another-model", "--join-timeout", "5")
    assert cluster.wait_exit([intruder], 10) == [1]
    err = intruder.stderr().strip().splitlines()
    assert len(err) == 1 and "schema" in err[0] and "FAILED_PRECONDITION" in err[0], err
    assert cluster.wait_exit(peers, 30) == [0, 0, 0]
    assert not c.events(peer_id="x")
    assert len(check_parity(peers)) == 8
    assert all(sorted(e["members"]) == ["p0", "p1", "p2"] for e in c.events("commit"))


@pytest.mark.timeout(60)
def test_duplicate_peer_id_is_refused_while_the_first_lives(cluster):
    c = cluster.start_coordinator(min_peers=1)
    p0, p1 = cluster.start_peer("p0", 1000), cluster.start_peer("p1", 1000)
    wait_for(lambda: all(len(p.records("round")) >= 2 for p in (p0, p1)), 20, "2 rounds on both")
    dup = cluster.start_peer("p1", 1000, "--join-timeout", "1")
    assert cluster.wait_exit([dup], 10) == [1]
    err = dup.stderr().strip().splitlines()
    assert len(err) == 1 and "ALREADY_EXISTS" in err[0] and "held by a live peer" in err[0], err
    assert p0.returncode is None and p1.returncode is None
    assert len(c.events("join", peer_id="p1")) == 1
    # once the first holder is gone, the id is free again after its lease
    p1.signal(signal.SIGKILL)
    t_kill = time.time()
    again = cluster.start_peer("p1", 1000, "--join-timeout", "10")
    wait_for(lambda: c.events("expire", peer_id="p1"), 10, "the old p1's lease to expire")
    wait_for(lambda: len(_rounds_after(again, t_kill)) >= 2, 15, "the new p1 to commit")
    _stop_all(cluster, [p0, again])
    assert again.records("heal")
    check_parity([p0, p1, again])
