"""The coordinator's round protocol (``dtrain.control.quorum``), tested as a pure state machine.

Deterministic unit tests walk through each rule of the protocol (joining,
forming, voting, healing, restarts, deadlines); a hypothesis stateful test then
drives random sequences of joins, syncs, votes, leaves, clock jumps and
coordinator restarts with a minimal model of the peers, and checks the
protocol's safety invariants after every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dtrain.control.quorum import (
    CommitAnswer,
    Params,
    QuorumInfo,
    QuorumMachine,
    Refusal,
    SyncAnswer,
)
from dtrain.control.work_plan import WorkPlan
from dtrain.wire.outcomes import CommitDecision, MemberState, SyncOutcome

SCHEMA = "5c" * 32


def H(r: int) -> str:
    """The (agreed) state hash of S_r in these tests."""
    return f"h{r:04d}"


def machine(**kw) -> QuorumMachine:
    base = dict(min_peers=1, lease_timeout=5.0, heartbeat_interval=1.0, grace=1.0, commit_timeout=30.0)
    base.update(kw)
    return QuorumMachine(Params(**base))


def join(
    m: QuorumMachine,
    pid: str,
    now: float = 0.0,
    round: int = 0,
    state_hash: Optional[str] = None,
    inc: str = "inc1",
    region: str = "",
    address: Optional[str] = None,
    schema: str = SCHEMA,
    world_size: int = 1,
):
    return m.join(
        pid,
        inc,
        address or f"{pid}.example:7000",
        schema,
        world_size,
        region,
        round,
        H(round) if state_hash is None else state_hash,
        now,
    )


def refused(code: str, fn, *args, **kw) -> Refusal:
    with pytest.raises(Refusal) as e:
        fn(*args, **kw)
    assert e.value.code == code, e.value.message
    return e.value


def sync_all(m: QuorumMachine, pids, now: float, round: Optional[int] = None, inc: str = "inc1"):
    """Every peer syncs; returns each one's answer (direct or handed over later)."""
    r = m.committed_round if round is None else round
    direct = {pid: m.sync(pid, inc, r, H(r), now) for pid in pids}
    return {pid: direct[pid] or m.take_sync_answer(pid, r) for pid in pids}


def commit_all(m: QuorumMachine, q: QuorumInfo, now: float, ok: bool = True, inc: str = "inc1"):
    direct = {pid: m.commit(pid, inc, q.round, q.quorum_id, ok, now) for pid in q.ids}
    return {pid: direct[pid] or m.take_commit_answer(pid, q.round, q.quorum_id) for pid in q.ids}


def full_round(m: QuorumMachine, pids, now: float) -> QuorumInfo:
    answers = sync_all(m, pids, now)
    q = answers[pids[0]].quorum
    assert q is not None and all(a.outcome is SyncOutcome.QUORUM and a.quorum == q for a in answers.values())
    decisions = commit_all(m, q, now)
    assert all(d.decision is CommitDecision.COMMIT for d in decisions.values())
    return q


def kinds(events) -> List[str]:
    return [e["event"] for e in events]


# ====================================================================== join validation


@pytest.mark.parametrize("pid", ["", "a b", "x" * 129, "peer/1", "pé", None])
def test_join_refuses_bad_peer_id(pid):
    m = machine()
    refused("INVALID_ARGUMENT", m.join, pid, "i", "h:1", SCHEMA, 1, "", 0, "", 0.0)
    assert not m.members


@pytest.mark.parametrize("address", ["", "host", "host:", "host:port", "a b:1", "host:123456", None])
def test_join_refuses_bad_address(address):
    m = machine()
    refused("INVALID_ARGUMENT", m.join, "a", "i", address, SCHEMA, 1, "", 0, "", 0.0)
    assert not m.members


def test_join_accepts_ipv6_and_dns_addresses():
    m = machine()
    join(m, "a", address="[::1]:7000")
    join(m, "b", address="node-3.cluster.local:65535")
    assert set(m.members) == {"a", "b"}


def test_join_refuses_world_size_zero_and_empty_incarnation():
    m = machine()
    refused("INVALID_ARGUMENT", join, m, "a", world_size=0)
    refused("INVALID_ARGUMENT", join, m, "a", inc="")
    assert not m.members


def test_join_refuses_empty_schema_hash():
    m = machine()
    refused("INVALID_ARGUMENT", join, m, "a", schema="")
    assert m.schema_hash == "" and not m.members


def test_first_joiner_sets_the_schema_and_others_must_match():
    m = machine()
    join(m, "a")
    assert m.schema_hash == SCHEMA and m.dirty and m.snapshot()["schema_hash"] == SCHEMA
    refused("FAILED_PRECONDITION", join, m, "b", schema="ff" * 32)
    assert set(m.members) == {"a"}
    join(m, "b")
    assert set(m.members) == {"a", "b"}


def test_pinned_schema_refuses_another_one_even_from_the_first_joiner():
    m = QuorumMachine(Params(schema_hash="aa" * 32))
    refused("FAILED_PRECONDITION", join, m, "a")
    assert m.schema_hash == "aa" * 32 and not m.members


# ====================================================================== membership


def test_duplicate_peer_id_refused_while_lease_live_then_accepted():
    m = machine(lease_timeout=5.0)
    join(m, "a", now=0.0, inc="old")
    m.heartbeat("a", "old", now=3.0)
    e = refused("ALREADY_EXISTS", join, m, "a", now=7.5, inc="new")
    assert "old" in e.message
    assert m.members["a"].incarnation == "old"
    # the old incarnation stops calling: 5 s after its last call the id is free again
    r = join(m, "a", now=8.01, inc="new")
    assert m.members["a"].incarnation == "new" and not r.must_heal
    refused("PERMISSION_DENIED", m.heartbeat, "a", "old", 8.5)
    assert [e["event"] for e in m.drain_events()] == ["join", "expire", "join"]


def test_rejoin_of_same_incarnation_is_idempotent():
    m = machine()
    join(m, "a", now=0.0, address="a.example:1", region="eu")
    m.drain_events()
    epoch = m.epoch
    r = join(m, "a", now=2.0, address="a.example:2", region="us", world_size=4)
    assert not r.must_heal
    assert list(m.members) == ["a"]
    a = m.members["a"]
    assert (a.address, a.region, a.world_size, a.last_seen, a.joined_at) == ("a.example:2", "us", 4, 2.0, 0.0)
    assert m.epoch == epoch and m.drain_events() == []


def test_calls_from_non_members_and_wrong_incarnations_are_denied():
    m = machine()
    for fn, args in (
        (m.heartbeat, ("ghost", "i", 0.0)),
        (m.sync, ("ghost", "i", 0, H(0), 0.0)),
        (m.commit, ("ghost", "i", 0, 1, True, 0.0)),
    ):
        refused("PERMISSION_DENIED", fn, *args)
    join(m, "a", inc="inc1")
    refused("PERMISSION_DENIED", m.heartbeat, "a", "other", 0.1)
    refused("PERMISSION_DENIED", m.sync, "a", "other", 0, H(0), 0.1)
    refused("PERMISSION_DENIED", m.commit, "a", "other", 0, 1, True, 0.1)
    m.leave("a", "other", 0.2)  # a leave of another incarnation is ignored
    assert "a" in m.members
    assert m.heartbeat("a", "inc1", 0.3) == (0, 0)
    m.leave("a", "inc1", 0.4)
    m.leave("a", "inc1", 0.5)  # idempotent
    assert not m.members
    refused("PERMISSION_DENIED", m.heartbeat, "a", "inc1", 0.6)


def test_calls_renew_the_lease():
    m = machine(lease_timeout=5.0)
    join(m, "a", now=0.0)
    for t in (4.0, 8.0, 12.0):
        m.heartbeat("a", "inc1", t)
    m.poll(16.9)
    assert "a" in m.members
    m.poll(17.01)
    assert "a" not in m.members


def test_a_call_after_the_own_lease_expired_is_denied_even_without_poll():
    m = machine(lease_timeout=5.0)
    join(m, "a", now=0.0)
    join(m, "b", now=0.0)
    refused("PERMISSION_DENIED", m.heartbeat, "a", "inc1", 5.5)
    assert set(m.members) == set()  # b's lease expired as well
    join(m, "a", now=6.0)
    assert set(m.members) == {"a"}


# ====================================================================== a full round


def test_full_round_with_three_peers():
    m = machine(min_peers=2)
    join(m, "c", region="eu")
    join(m, "a", region="us")
    join(m, "b", region="eu")
    m.drain_events()
    assert m.sync("a", "inc1", 0, H(0), 0.1) is None
    assert m.sync("b", "inc1", 0, H(0), 0.2) is None
    assert m.phase == "collecting"
    ans = m.sync("c", "inc1", 0, H(0), 0.3)  # everyone expected has synced: no grace wait
    assert ans is not None and ans.outcome is SyncOutcome.QUORUM and ans.round == 0
    q = ans.quorum
    assert q.ids == ("b", "c", "a")  # ring order: by region, then peer id
    assert q.members[0] == ("b", "b.example:7000", 1, "eu")
    assert q.round == 0 and q.state_hash == H(0) and q.commit_timeout == 30.0 and q.quorum_id == 1
    assert m.phase == "voting"
    assert m.take_sync_answer("a", 0) == SyncAnswer(SyncOutcome.QUORUM, 0, quorum=q)
    assert m.take_sync_answer("a", 0) is None  # handed over once
    assert m.take_sync_answer("b", 1) is None  # wrong round
    assert m.take_sync_answer("b", 0).quorum == q
    assert m.commit("a", "inc1", 0, q.quorum_id, True, 1.0) is None
    assert m.commit("b", "inc1", 0, q.quorum_id, True, 1.1) is None
    assert m.take_commit_answer("a", 0, q.quorum_id) is None
    c = m.commit("c", "inc1", 0, q.quorum_id, True, 1.2)
    assert c == CommitAnswer(CommitDecision.COMMIT, 0, q.quorum_id)
    assert m.take_commit_answer("a", 0, q.quorum_id + 1) is None  # wrong quorum
    assert m.take_commit_answer("a", 0, q.quorum_id).decision is CommitDecision.COMMIT
    assert m.take_commit_answer("b", 0, q.quorum_id).decision is CommitDecision.COMMIT
    assert m.committed_round == 1 and m.phase == "collecting"
    rec = m.history[-1]
    assert (rec.round, rec.quorum_id, rec.members, rec.state_hash) == (0, 1, ["b", "c", "a"], H(0))
    assert all(m.members[p].round == 1 for p in "abc")
    assert kinds(m.drain_events()) == ["active", "active", "active", "quorum", "commit"]
    assert m.heartbeat("a", "inc1", 2.0) == (1, 1)


def test_first_sync_makes_a_joiner_active():
    m = machine()
    join(m, "a")
    join(m, "b")
    assert m.members["a"].state is MemberState.JOINING
    m.sync("a", "inc1", 0, H(0), 0.1)
    assert m.members["a"].state is MemberState.ACTIVE and m.members["b"].state is MemberState.JOINING
    assert m.status(0.2)["members"][0]["state"] == "active"


def test_grace_window_forms_quorum_with_two_of_three():
    m = machine(min_peers=2, grace=1.0)
    for p in "abc":
        join(m, p, now=0.0)
    assert m.sync("a", "inc1", 0, H(0), 0.2) is None
    assert m.sync("b", "inc1", 0, H(0), 0.5) is None
    assert m.next_deadline() == pytest.approx(1.2)  # the grace window ends first
    m.poll(1.1)
    assert m.phase == "collecting"
    m.poll(1.2)
    assert m.phase == "voting"
    qa, qb = m.take_sync_answer("a", 0), m.take_sync_answer("b", 0)
    assert qa.quorum == qb.quorum and qa.quorum.ids == ("a", "b")


def test_no_quorum_with_one_of_three_members():
    m = machine(min_peers=1, grace=1.0)
    for p in "abc":
        join(m, p)
    assert m.sync("a", "inc1", 0, H(0), 0.0) is None
    for t in (1.0, 2.0, 4.0):
        m.poll(t)
        m.heartbeat("b", "inc1", t)
        m.heartbeat("c", "inc1", t)
    assert m.phase == "collecting" and m.take_sync_answer("a", 0) is None
    # a second member arrives after the grace window: 2 of 3 is a majority, it forms at once
    ans = m.sync("b", "inc1", 0, H(0), 4.5)
    assert ans.quorum.ids == ("a", "b")
    assert m.take_sync_answer("a", 0).quorum == ans.quorum


def test_no_quorum_below_min_peers_even_when_everybody_synced():
    m = machine(min_peers=3)
    join(m, "a")
    join(m, "b")
    sync_all(m, ["a", "b"], 0.1)
    m.poll(2.0)
    assert m.phase == "collecting"
    join(m, "c", now=2.5)
    ans = m.sync("c", "inc1", 0, H(0), 2.6)
    assert ans.outcome is SyncOutcome.QUORUM and ans.quorum.ids == ("a", "b", "c")


def test_two_of_four_is_not_a_majority():
    m = machine(min_peers=1)
    for p in "abcd":
        join(m, p)
    sync_all(m, ["a", "b"], 0.0)
    m.poll(1.5)
    assert m.phase == "collecting"
    m.sync("c", "inc1", 0, H(0), 1.6)
    m.poll(1.6)
    assert m.voting.quorum.ids == ("a", "b", "c")


# ====================================================================== voting and retries


def _voting(m: QuorumMachine, pids, now: float = 0.0) -> QuorumInfo:
    for p in pids:
        if p not in m.members:
            join(m, p, now=now, round=m.committed_round)
    answers = sync_all(m, pids, now)
    q = answers[pids[0]].quorum
    assert q is not None and set(q.ids) == set(pids)
    return q


def test_not_ok_vote_retries_everyone_and_next_quorum_gets_new_id():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b", "c"])
    assert m.commit("a", "inc1", 0, q.quorum_id, True, 1.0) is None
    r = m.commit("b", "inc1", 0, q.quorum_id, False, 1.1, reason="collective timed out")
    assert r.decision is CommitDecision.RETRY and "collective timed out" in r.reason
    assert m.take_commit_answer("a", 0, q.quorum_id).decision is CommitDecision.RETRY
    assert m.take_commit_answer("c", 0, q.quorum_id).decision is CommitDecision.RETRY
    assert m.committed_round == 0 and m.phase == "collecting"
    # c's answer was handed over: asking again with that quorum is stale
    refused("ABORTED", m.commit, "c", "inc1", 0, q.quorum_id, True, 1.2)
    q2 = _voting(m, ["a", "b", "c"], now=2.0)
    assert q2.quorum_id > q.quorum_id and q2.ids == q.ids


def test_retry_answer_is_kept_for_a_member_that_asks_later():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b"])
    m.commit("a", "inc1", 0, q.quorum_id, False, 1.0)
    r = m.commit("b", "inc1", 0, q.quorum_id, True, 1.5)
    assert r.decision is CommitDecision.RETRY


def test_commit_deadline_passing_retries():
    m = machine(min_peers=2, commit_timeout=10.0, lease_timeout=100.0)
    q = _voting(m, ["a", "b"], now=1.0)
    assert m.next_deadline() == pytest.approx(11.0)
    m.commit("a", "inc1", 0, q.quorum_id, True, 5.0)
    m.poll(10.9)
    assert m.phase == "voting"
    m.poll(11.0)
    assert m.phase == "collecting"
    a = m.take_commit_answer("a", 0, q.quorum_id)
    assert a.decision is CommitDecision.RETRY and "deadline" in a.reason and "b" in a.reason
    assert kinds(m.drain_events())[-1] == "retry"


def test_vote_after_the_deadline_is_a_retry_even_before_poll():
    m = machine(min_peers=2, commit_timeout=10.0, lease_timeout=100.0)
    q = _voting(m, ["a", "b"], now=0.0)
    m.commit("a", "inc1", 0, q.quorum_id, True, 5.0)
    assert m.commit("b", "inc1", 0, q.quorum_id, True, 10.5).decision is CommitDecision.RETRY
    assert m.committed_round == 0


def test_member_lease_expiring_while_voting_retries_before_the_deadline():
    m = machine(min_peers=2, lease_timeout=5.0, commit_timeout=30.0)
    q = _voting(m, ["a", "b", "c"], now=0.0)
    m.commit("a", "inc1", 0, q.quorum_id, True, 3.0)
    m.commit("b", "inc1", 0, q.quorum_id, True, 3.0)
    assert m.next_deadline() == pytest.approx(5.0)  # c's lease
    m.poll(5.01)
    assert "c" not in m.members and m.phase == "collecting"
    assert m.take_commit_answer("a", 0, q.quorum_id).decision is CommitDecision.RETRY
    assert m.take_commit_answer("b", 0, q.quorum_id).decision is CommitDecision.RETRY
    assert m.take_commit_answer("c", 0, q.quorum_id) is None
    assert kinds(m.drain_events())[-2:] == ["expire", "retry"]


def test_member_leaving_while_voting_retries():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b", "c"])
    m.commit("a", "inc1", 0, q.quorum_id, True, 1.0)
    m.leave("c", "inc1", 1.5, reason="spot instance reclaimed")
    a = m.take_commit_answer("a", 0, q.quorum_id)
    assert a.decision is CommitDecision.RETRY and "spot instance reclaimed" in a.reason
    # the others form the next attempt without c
    q2 = _voting(m, ["a", "b"], now=2.0)
    assert q2.quorum_id > q.quorum_id
    assert all(d.decision is CommitDecision.COMMIT for d in commit_all(m, q2, 2.5).values())


def test_a_non_member_leaving_while_voting_changes_nothing():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b"])
    join(m, "x")
    m.leave("x", "inc1", 1.0)
    assert m.phase == "voting" and m.voting.quorum == q


def test_member_syncing_again_during_voting_retries_and_joins_next_attempt():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b"])
    m.commit("a", "inc1", 0, q.quorum_id, True, 1.0)
    assert m.sync("b", "inc1", 0, H(0), 1.1) is None  # b gave up on the collective
    assert m.take_commit_answer("a", 0, q.quorum_id).decision is CommitDecision.RETRY
    ans = m.sync("a", "inc1", 0, H(0), 1.2)
    assert ans.outcome is SyncOutcome.QUORUM and ans.quorum.quorum_id > q.quorum_id
    assert m.take_sync_answer("b", 0).quorum == ans.quorum


def test_an_uncollected_retry_is_not_handed_out_for_the_next_quorum():
    m = machine(min_peers=2)
    q1 = _voting(m, ["a", "b"])
    assert m.sync("a", "inc1", 0, H(0), 1.0) is None  # a gives up on q1 without voting: RETRY for a waits
    q2 = m.sync("b", "inc1", 0, H(0), 1.1).quorum
    assert q2.quorum_id > q1.quorum_id
    assert m.commit("a", "inc1", 0, q2.quorum_id, True, 1.2) is None  # not q1's RETRY
    assert m.commit("b", "inc1", 0, q2.quorum_id, True, 1.3).decision is CommitDecision.COMMIT
    assert m.take_commit_answer("a", 0, q2.quorum_id).decision is CommitDecision.COMMIT
    assert m.take_commit_answer("a", 0, q1.quorum_id) is None


def test_repeated_sync_gets_the_answer_already_given_without_a_retry():
    m = machine(min_peers=2)
    join(m, "a")
    join(m, "b")
    assert m.sync("a", "inc1", 0, H(0), 0.0) is None
    q = m.sync("b", "inc1", 0, H(0), 0.1).quorum
    # a's held call timed out before it took its answer; it calls again
    assert m.sync("a", "inc1", 0, H(0), 0.5).quorum == q
    assert m.phase == "voting"


def test_quorum_id_kept_while_membership_unchanged_and_bumped_on_change():
    m = machine(min_peers=1)
    for p in "ab":
        join(m, p)
    q0 = full_round(m, ["a", "b"], 0.1)
    q1 = full_round(m, ["a", "b"], 0.2)
    assert q1.quorum_id == q0.quorum_id and q1.round == 1
    join(m, "c", now=0.3, round=2)
    q2 = full_round(m, ["a", "b", "c"], 0.4)
    assert q2.quorum_id == q1.quorum_id + 1
    q3 = full_round(m, ["a", "b", "c"], 0.5)
    assert q3.quorum_id == q2.quorum_id
    m.leave("c", "inc1", 0.6)
    q4 = full_round(m, ["a", "b"], 0.7)
    assert q4.quorum_id == q3.quorum_id + 1
    assert [r.quorum_id for r in m.history] == [1, 1, 2, 2, 3]


def test_quorum_id_bumped_after_a_retry_even_with_same_members():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b"])
    commit_all(m, q, 0.5, ok=False)
    q2 = _voting(m, ["a", "b"], now=1.0)
    assert q2.quorum_id == q.quorum_id + 1


# ====================================================================== healing


def test_state_hash_mismatch_heals_the_minority_from_the_majority():
    m = machine(min_peers=2)
    for p in "abc":
        join(m, p)
    assert m.sync("a", "inc1", 0, H(0), 0.1) is None
    assert m.sync("c", "inc1", 0, "corrupt", 0.2) is None
    ans_b = m.sync("b", "inc1", 0, H(0), 0.3)
    assert ans_b.quorum.ids == ("a", "b") and ans_b.quorum.state_hash == H(0)
    heal = m.take_sync_answer("c", 0)
    assert heal.outcome is SyncOutcome.HEAL and heal.donor.peer_id in ("a", "b")
    assert heal.donor.address == f"{heal.donor.peer_id}.example:7000"
    assert heal.donor.state_hash == H(0) and heal.donor.round == 0
    assert "differs" in heal.reason


def test_hash_recorded_for_a_round_stays_the_reference():
    m = machine(min_peers=1)
    for p in "abc":
        join(m, p)
    m.sync("a", "inc1", 0, H(0), 0.0)
    m.sync("b", "inc1", 0, H(0), 0.0)
    assert m.phase == "collecting"
    m.poll(1.0)  # grace: a and b form with H(0)
    q = m.voting.quorum
    assert q.state_hash == H(0)
    commit_all(m, q, 1.1, ok=False)
    # b and c now report another hash: H(0), recorded for round 0, stays the reference, and
    # without a majority for it nothing forms (a known stall; see the report)
    m.sync("a", "inc1", 0, H(0), 2.0)
    m.sync("b", "inc1", 0, "other", 2.0)
    m.sync("c", "inc1", 0, "other", 2.0)
    assert m.phase == "collecting"  # H(0) has no majority: nothing forms on "other"
    assert m.known_hash == H(0)


def test_peer_behind_is_told_to_heal_from_a_holder():
    m = machine(min_peers=1)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    full_round(m, ["a", "b"], 0.2)
    r = join(m, "j", now=0.3, round=0, state_hash=H(0))
    assert r.must_heal and r.committed_round == 2 and r.donor.peer_id in ("a", "b") and r.donor.round == 2
    ans = m.sync("j", "inc1", 0, H(0), 0.4)
    assert ans.outcome is SyncOutcome.HEAL and ans.round == 0 and ans.donor.peer_id in ("a", "b")
    assert "behind" in ans.reason


def test_peer_behind_waits_when_no_holder_exists():
    m = machine(min_peers=1)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    m2 = QuorumMachine(m.params, snapshot=m.snapshot())  # restart: nobody is known to hold S_1
    r = join(m2, "j", now=1.0, round=0)
    assert r.must_heal and r.donor is None
    ans = m2.sync("j", "inc1", 0, H(0), 1.1)
    assert ans.outcome is SyncOutcome.WAIT and ans.donor is None and "no up-to-date donor" in ans.reason
    # an up-to-date peer re-joins and forms round 1: now j can heal
    join(m2, "a", now=1.2, round=1)
    assert m2.sync("a", "inc1", 1, H(1), 1.3).outcome is SyncOutcome.QUORUM
    ans = m2.sync("j", "inc1", 0, H(0), 1.4)
    assert ans.outcome is SyncOutcome.HEAL and ans.donor.peer_id == "a"


def test_donors_are_spread_across_holders():
    m = machine(min_peers=1)
    for p in "abc":
        join(m, p)
    full_round(m, ["a", "b", "c"], 0.1)
    donors = [join(m, f"j{i}", now=0.2, round=0).donor.peer_id for i in range(3)]
    assert sorted(donors) == ["a", "b", "c"]
    more = [m.sync(f"j{i}", "inc1", 0, H(0), 0.3).donor.peer_id for i in range(3)]
    assert sorted(more) == ["a", "b", "c"]


def test_a_healing_joiner_is_never_its_own_donor():
    m = machine(min_peers=1)
    join(m, "a")
    full_round(m, ["a"], 0.1)
    r = join(m, "a", now=0.2, round=0)  # a re-joins reporting an old state
    assert r.must_heal and r.donor is None


def test_late_sync_during_voting_is_healed_after_the_commit():
    m = machine(min_peers=2, grace=1.0)
    for p in "abc":
        join(m, p)
    sync_all(m, ["a", "b"], 0.0)
    m.poll(1.0)
    q = m.voting.quorum
    assert m.sync("c", "inc1", 0, H(0), 1.5) is None  # late: the quorum is already voting
    commit_all(m, q, 2.0)
    heal = m.take_sync_answer("c", 0)
    assert heal.outcome is SyncOutcome.HEAL and heal.donor.peer_id in ("a", "b") and heal.donor.round == 1
    assert "committed without this peer" in heal.reason


def test_late_sync_during_voting_joins_the_next_attempt_after_a_retry():
    m = machine(min_peers=2, grace=1.0)
    for p in "abc":
        join(m, p)
    sync_all(m, ["a", "b"], 0.0)
    m.poll(1.0)
    q = m.voting.quorum
    assert m.sync("c", "inc1", 0, H(0), 1.5) is None
    commit_all(m, q, 2.0, ok=False)
    answers = sync_all(m, ["a", "b"], 2.5)
    assert answers["a"].quorum.ids == ("a", "b", "c")  # no grace wait: c's sync was kept
    assert m.take_sync_answer("c", 0).quorum == answers["a"].quorum


def test_a_joiner_that_must_heal_does_not_hold_up_quorums():
    m = machine(min_peers=1, grace=2.0)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    r = join(m, "j", now=1.0, round=0)
    assert r.must_heal
    assert m.sync("j", "inc1", 0, H(0), 1.1).outcome is SyncOutcome.HEAL
    # j is waited for only while the grace window is open, and does not count for the majority
    for p in "ab":
        assert m.sync(p, "inc1", 1, H(1), 1.2) is None
    m.poll(1.2 + 2.0 + 0.01)
    q = m.take_sync_answer("a", 1).quorum
    assert q.ids == ("a", "b")
    commit_all(m, q, 3.3)
    # one member and one healer: the member alone still commits (the healer does not count)
    m.leave("b", "inc1", 3.4)
    assert m.sync("a", "inc1", 2, H(2), 3.5).outcome is SyncOutcome.QUORUM


def test_a_healer_quicker_than_a_round_enters_at_the_next_boundary():
    m = machine(min_peers=1, grace=5.0)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    join(m, "j", now=1.0, round=0)
    assert m.sync("j", "inc1", 0, H(0), 1.1).outcome is SyncOutcome.HEAL
    for p in "ab":
        assert m.sync(p, "inc1", 1, H(1), 1.2) is None  # waiting for the healer
    ans = m.sync("j", "inc1", 1, H(1), 1.5)  # healed within the grace window
    assert ans.outcome is SyncOutcome.QUORUM and ans.quorum.ids == ("a", "b", "j")


def test_a_healer_counts_again_once_it_syncs_the_current_round():
    m = machine(min_peers=1, grace=1.0)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    join(m, "j", now=0.2, round=0)  # joined behind: downloading S_1
    assert sync_all(m, ["a", "b"], 0.3) == {"a": None, "b": None}  # round 1 waits (grace) for its healer
    m.poll(1.31)  # j did not make it: the window closes, round 1 forms without it
    q = m.take_sync_answer("a", 1).quorum
    assert q.ids == ("a", "b")
    commit_all(m, q, 1.4)
    assert m.sync("j", "inc1", 1, H(1), 1.5).outcome is SyncOutcome.HEAL  # behind again: S_2 now
    full_round_after = sync_all(m, ["a", "b"], 1.6)
    assert full_round_after == {"a": None, "b": None}
    ans = m.sync("j", "inc1", 2, H(2), 1.7)  # healed in time: the quorum of round 2 includes it
    assert ans.quorum.ids == ("a", "b", "j") == m.take_sync_answer("a", 2).quorum.ids


def test_a_joiner_healing_to_the_current_round_is_waited_for_up_to_heal_grace():
    m = machine(min_peers=1, grace=0.5, heal_grace=5.0, lease_timeout=60.0)
    for p in "ab":
        join(m, p)
    full_round(m, ["a", "b"], 0.1)
    r = join(m, "j", now=0.2, round=0)
    assert r.must_heal and r.donor.round == 1
    assert sync_all(m, ["a", "b"], 0.3) == {"a": None, "b": None}
    assert m.next_deadline() == pytest.approx(5.3)  # heal_grace, not grace, while the joiner is missing
    m.poll(1.0)
    assert m.take_sync_answer("a", 1) is None  # past grace, within heal_grace: still waiting
    ans = m.sync("j", "inc1", 1, H(1), 2.0)
    assert ans.quorum.ids == ("a", "b", "j") == m.take_sync_answer("a", 1).quorum.ids


def test_rejoin_reporting_an_old_state_withdraws_the_earlier_sync():
    m = machine(min_peers=1, grace=10.0, lease_timeout=60.0)
    for p in "abc":
        join(m, p)
    full_round(m, ["a", "b", "c"], 0.1)
    assert m.sync("a", "inc1", 1, H(1), 0.2) is None
    r = join(m, "a", now=0.3, round=0)  # the same process re-joins, now holding S_0 only
    assert r.must_heal and r.donor.peer_id in ("b", "c")
    assert sync_all(m, ["b", "c"], 0.4) == {"b": None, "c": None}  # its earlier sync no longer counts
    m.poll(10.5)  # it does not come back in the window: the round forms without it
    assert m.take_sync_answer("b", 1).quorum.ids == ("b", "c")


def test_fresh_run_joiners_need_no_healing():
    m = machine()
    r = join(m, "a", round=0, state_hash="")
    assert not r.must_heal and r.donor is None and r.committed_round == 0


def test_joiner_with_the_recorded_hash_is_up_to_date():
    m = machine(min_peers=1)
    join(m, "a")
    full_round(m, ["a"], 0.1)
    m.sync("a", "inc1", 1, H(1), 0.2)  # forms round 1: H(1) is recorded
    assert not join(m, "b", now=0.3, round=1, state_hash=H(1)).must_heal
    r = join(m, "c", now=0.3, round=1, state_hash="bogus")
    assert r.must_heal and r.donor.peer_id == "a" and r.committed_state_hash == H(1)


def test_join_or_sync_ahead_of_the_coordinator_is_refused():
    m = machine(min_peers=1)
    join(m, "a")
    full_round(m, ["a"], 0.1)
    e = refused("OUT_OF_RANGE", m.sync, "a", "inc1", 5, H(5), 0.2)
    assert "state_dir" in e.message
    refused("OUT_OF_RANGE", join, m, "b", now=0.3, round=5)
    assert "b" not in m.members
    assert m.members["a"].round == 1  # the refused sync changed nothing


def test_sync_with_empty_state_hash_is_refused():
    m = machine()
    join(m, "a")
    refused("INVALID_ARGUMENT", m.sync, "a", "inc1", 0, "", 0.1)


# ====================================================================== commits and restarts


def test_commit_is_idempotent_also_after_a_restart():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b"])
    commit_all(m, q, 1.0)
    again = m.commit("a", "inc1", 0, q.quorum_id, True, 1.5)
    assert again.decision is CommitDecision.COMMIT and again.round == 0 and again.quorum_id == q.quorum_id
    m2 = QuorumMachine(m.params, snapshot=json.loads(json.dumps(m.snapshot())))
    # members are soft state: not re-joined yet, still told the decision
    a = m2.commit("b", "inc1", 0, q.quorum_id, True, 2.0)
    assert a.decision is CommitDecision.COMMIT
    refused("ABORTED", m.commit, "a", "inc1", 0, q.quorum_id + 7, True, 1.6)


def test_stale_commits_are_aborted():
    m = machine(min_peers=2)
    join(m, "a")
    join(m, "b")
    refused("ABORTED", m.commit, "a", "inc1", 0, 1, True, 0.0)  # nothing is being voted on
    q = _voting(m, ["a", "b"])
    refused("ABORTED", m.commit, "a", "inc1", 0, q.quorum_id + 1, True, 0.1)  # wrong quorum
    refused("ABORTED", m.commit, "a", "inc1", 1, q.quorum_id, True, 0.1)  # wrong round
    join(m, "x")
    refused("ABORTED", m.commit, "x", "inc1", 0, q.quorum_id, True, 0.1)  # not in the quorum
    assert m.phase == "voting" and m.voting.votes == {}


def test_restart_keeps_the_durable_state():
    m = machine(min_peers=1)
    join(m, "a")
    for i in range(3):
        full_round(m, ["a"], 0.1 * i)
    m.sync("a", "inc1", 3, H(3), 1.0)  # round 3 is voting at the crash
    snap = json.loads(json.dumps(m.snapshot()))
    m2 = QuorumMachine(m.params, snapshot=snap)
    assert (m2.committed_round, m2.quorum_id, m2.schema_hash, m2.known_hash) == (3, m.quorum_id, SCHEMA, H(3))
    assert [(r.round, r.quorum_id, r.members) for r in m2.history] == [
        (r.round, r.quorum_id, r.members) for r in m.history
    ]
    assert not m2.members and m2.phase == "collecting" and not m2.dirty
    # members re-join; a new quorum never reuses an id
    join(m2, "a", now=2.0, round=3)
    ans = m2.sync("a", "inc1", 3, H(3), 2.1)
    assert ans.quorum.quorum_id > m.quorum_id
    refused("ABORTED", m2.commit, "a", "inc1", 3, m.quorum_id, True, 2.2)
    assert m2.commit("a", "inc1", 3, ans.quorum.quorum_id, True, 2.3).decision is CommitDecision.COMMIT


def test_restart_with_a_peer_whose_state_disagrees_with_the_recorded_hash():
    m = machine(min_peers=1)
    join(m, "a")
    full_round(m, ["a"], 0.0)
    m.sync("a", "inc1", 1, H(1), 0.5)
    m2 = QuorumMachine(m.params, snapshot=m.snapshot())
    assert join(m2, "b", now=1.0, round=1, state_hash="other").must_heal
    assert not join(m2, "a", now=1.0, round=1).must_heal


def test_history_is_bounded():
    m = machine(min_peers=1, history=3)
    join(m, "a")
    for i in range(5):
        full_round(m, ["a"], 0.1 * i)
    assert [r.round for r in m.history] == [2, 3, 4]
    assert m.commit("a", "inc1", 4, 1, True, 1.0).decision is CommitDecision.COMMIT
    refused("ABORTED", m.commit, "a", "inc1", 0, 1, True, 1.0)  # beyond the history: unknown


def test_history_of_zero_keeps_nothing():
    m = machine(min_peers=1, history=0)
    join(m, "a")
    full_round(m, ["a"], 0.0)
    assert m.history == [] and m.committed_round == 1


# ====================================================================== deadlines and dirty


def test_next_deadline_covers_leases_grace_and_commit_deadline():
    m = machine(min_peers=2, lease_timeout=5.0, grace=1.0, commit_timeout=3.0)
    assert m.next_deadline() is None
    join(m, "a", now=0.0)
    join(m, "b", now=0.5)
    join(m, "c", now=0.6)
    assert m.next_deadline() == pytest.approx(5.0)  # a's lease
    m.sync("a", "inc1", 0, H(0), 0.7)
    m.sync("b", "inc1", 0, H(0), 0.8)
    assert m.next_deadline() == pytest.approx(1.7)  # grace after a's sync
    m.poll(1.7)
    assert m.phase == "voting"
    m.heartbeat("c", "inc1", 1.8)
    assert m.next_deadline() == pytest.approx(4.7)  # commit deadline before any lease (b: 5.8)
    m.poll(4.7)
    assert m.phase == "collecting"
    assert m.next_deadline() == pytest.approx(5.7)  # a's lease (renewed at its sync)


def test_next_deadline_does_not_stay_in_the_past_after_the_grace_window():
    m = machine(min_peers=1, lease_timeout=5.0, grace=1.0)
    for p in "abc":
        join(m, p, now=0.0)
    m.sync("a", "inc1", 0, H(0), 0.0)
    assert m.next_deadline() == pytest.approx(1.0)
    m.poll(1.0)  # 1 of 3: no quorum
    assert m.phase == "collecting"
    assert m.next_deadline() == pytest.approx(5.0)  # the next lease, not the spent grace window


def test_dirty_is_set_whenever_the_snapshot_changes():
    m = machine(min_peers=1)
    snaps = [m.snapshot()]

    def step(fn, *args):
        m.dirty = False
        out = fn(*args)
        s = m.snapshot()
        assert m.dirty == (s != snaps[-1]), fn.__name__
        snaps.append(s)
        return out

    step(join, m, "a")  # schema adopted
    assert m.dirty
    step(join, m, "b")
    step(m.heartbeat, "a", "inc1", 0.1)
    step(m.sync, "a", "inc1", 0, H(0), 0.2)
    q = step(m.sync, "b", "inc1", 0, H(0), 0.3).quorum  # quorum id and hash recorded
    step(m.commit, "a", "inc1", 0, q.quorum_id, True, 0.4)
    step(m.commit, "b", "inc1", 0, q.quorum_id, True, 0.5)  # committed
    assert m.dirty
    step(m.sync, "a", "inc1", 1, H(1), 0.6)
    q = step(m.sync, "b", "inc1", 1, H(1), 0.7).quorum  # same quorum id, new hash
    assert m.dirty
    step(m.commit, "a", "inc1", 1, q.quorum_id, False, 0.8)
    step(m.poll, 0.9)
    step(m.leave, "b", "inc1", 1.0)
    step(m.poll, 100.0)


def test_membership_changes_are_events():
    m = machine(min_peers=1, lease_timeout=5.0)
    join(m, "a", now=0.0)
    join(m, "b", now=0.0)
    m.sync("a", "inc1", 0, H(0), 0.1)
    m.leave("a", "inc1", 0.2, reason="done")
    m.poll(6.0)
    ev = m.drain_events()
    assert kinds(ev) == ["join", "join", "active", "leave", "expire"]
    assert ev[3] == {"event": "leave", "peer_id": "a", "reason": "done"}
    assert m.drain_events() == []


# ====================================================================== expiry ordering


def test_members_expiring_together_never_form_a_quorum_among_themselves():
    m = machine(min_peers=1, lease_timeout=5.0, grace=100.0)
    for p in "abc":
        join(m, p, now=0.0)
    m.sync("b", "inc1", 0, H(0), 0.0)
    m.sync("c", "inc1", 0, H(0), 1.0)
    m.heartbeat("c", "inc1", 3.0)
    # a and b expire together at 5.5: b's stale sync must not make a quorum with c
    m.poll(5.5)
    assert set(m.members) == {"c"}
    assert m.phase == "voting" and m.voting.quorum.ids == ("c",)
    assert "quorum" in kinds(m.drain_events())


# ====================================================================== liveness


def test_a_dead_peer_holds_a_round_up_for_at_most_its_lease_plus_one_retry():
    p = dict(min_peers=2, lease_timeout=5.0, grace=1.0, commit_timeout=60.0)
    m = machine(**p)
    alive = ["a", "b", "c"]
    for x in alive + ["d"]:
        join(m, x, now=0.0)
    full_round(m, alive + ["d"], 0.0)
    # round 1: the quorum forms with all four, then d dies before it votes
    q = _voting(m, alive + ["d"], now=1.0)
    for x in alive:
        assert m.commit(x, "inc1", 1, q.quorum_id, True, 1.5) is None
    t, step = 1.5, 0.25
    committed_at = None
    pending = {x: ("commit", q) for x in alive}
    while t < 1.0 + p["lease_timeout"] + p["grace"] + 1.0 and committed_at is None:
        t += step
        for x in alive:
            m.heartbeat(x, "inc1", t)
        m.poll(t)
        for x in alive:
            kind, qq = pending[x]
            if kind == "commit":
                a = m.take_commit_answer(x, qq.round, qq.quorum_id)
                if a is not None and a.decision is CommitDecision.RETRY:
                    pending[x] = ("sync", None)
                    s = m.sync(x, "inc1", 1, H(1), t)
                    if s is not None:
                        pending[x] = ("vote", s.quorum)
            elif kind == "sync":
                s = m.take_sync_answer(x, 1)
                if s is not None:
                    pending[x] = ("vote", s.quorum)
        for x in alive:
            kind, qq = pending[x]
            if kind == "vote":
                pending[x] = ("commit", qq)
                a = m.commit(x, "inc1", 1, qq.quorum_id, True, t)
                if a is not None and a.decision is CommitDecision.COMMIT:
                    committed_at = t
        if m.committed_round == 2 and committed_at is None:
            committed_at = t
    assert m.committed_round == 2, m.status(t)
    assert committed_at <= 1.0 + p["lease_timeout"] + p["grace"] + 0.5
    assert m.history[-1].members == alive


def test_a_peer_dying_before_it_syncs_delays_the_round_only_by_grace():
    m = machine(min_peers=2, lease_timeout=5.0, grace=1.0)
    for x in "abcd":
        join(m, x, now=0.0)
    full_round(m, list("abcd"), 0.0)
    for x in "abc":
        assert m.sync(x, "inc1", 1, H(1), 0.5) is None
    m.poll(1.5)
    q = m.voting.quorum
    assert q.ids == ("a", "b", "c")
    commit_all(m, q, 1.6)
    assert m.committed_round == 2


# ====================================================================== accusations need evidence


def _report(m: QuorumMachine, accuser: str, culprit: str, q: QuorumInfo, now: float, evidence: str = "e" * 64):
    return m.report(accuser, "inc1", q.round, q.quorum_id, culprit, "garbage", now, evidence=evidence)


def test_one_accusation_alone_excludes_nobody():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b", "c"])
    assert _report(m, "a", "b", q, 0.2) is False
    assert "b" in m.members and m.voting is not None
    evs = m.drain_events()
    assert [e for e in evs if e["event"] == "report"][0]["evidence"] == "e" * 64
    assert "report_pending" in kinds(evs) and "exclude" not in kinds(evs)


def test_a_second_accuser_confirms_and_the_culprit_is_excluded():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b", "c"])
    assert _report(m, "a", "b", q, 0.2) is False
    assert _report(m, "c", "b", q, 0.3) is True
    assert "b" not in m.members and m.voting is None  # the vote retries without it
    exclude = [e for e in m.drain_events() if e["event"] == "exclude"]
    assert exclude[0]["peer_id"] == "b" and "'a', 'c'" in exclude[0]["reason"], exclude


def test_the_culprits_own_failed_vote_confirms_an_accusation():
    m = machine(min_peers=1)
    q = _voting(m, ["a", "b"])
    assert _report(m, "a", "b", q, 0.2) is False
    m.commit("b", "inc1", q.round, q.quorum_id, False, 0.3, reason="my collective failed")
    assert "b" not in m.members
    assert any(e["event"] == "exclude" and "its own vote failed" in e["reason"] for e in m.drain_events())


def test_a_report_after_the_culprits_failed_vote_confirms_too():
    m = machine(min_peers=1)
    q = _voting(m, ["a", "b"])
    m.commit("b", "inc1", q.round, q.quorum_id, False, 0.2, reason="payload refused")  # decides the retry
    assert _report(m, "a", "b", q, 0.3) is True  # about the quorum that just retried
    assert "b" not in m.members


def test_an_accuser_never_confirmed_is_excluded_after_max_unconfirmed_reports():
    m = machine(min_peers=2, max_unconfirmed_reports=2)
    now = 0.0
    for round in range(2):
        q = _voting(m, ["a", "b", "c"], now)
        assert q.round == round
        assert _report(m, "a", "b", q, now + 0.1) is False  # a lies; c, a third member, does not confirm
        commit_all(m, q, now + 0.2)
        now += 1.0
    assert "a" not in m.members and "b" in m.members
    evs = m.drain_events()
    assert [e["unconfirmed"] for e in evs if e["event"] == "report_unconfirmed"] == [1, 2]
    assert any(e["event"] == "exclude" and e["peer_id"] == "a" and "no other member" in e["reason"] for e in evs)


def test_a_confirmed_accusation_resets_the_accusers_count():
    m = machine(min_peers=2, max_unconfirmed_reports=2)
    for p in ("a", "b", "c", "d"):
        join(m, p, now=0.0)
    q = _voting(m, ["a", "b", "c", "d"], 0.0)
    _report(m, "a", "b", q, 0.1)
    commit_all(m, q, 0.2)
    assert m.unconfirmed == {"a": 1}
    q = _voting(m, ["a", "b", "c", "d"], 1.0)
    _report(m, "a", "d", q, 1.1)
    _report(m, "c", "d", q, 1.2)
    assert m.unconfirmed == {} and "d" not in m.members


def test_in_a_quorum_of_two_an_unconfirmed_report_costs_the_accuser_nothing():
    m = machine(min_peers=1, max_unconfirmed_reports=1)
    q = _voting(m, ["a", "b"])
    _report(m, "a", "b", q, 0.1)
    commit_all(m, q, 0.2)
    assert {"a", "b"} <= set(m.members) and m.unconfirmed == {}


def test_a_liar_that_vetoes_every_retry_is_excluded():
    """A member that accuses an honest one and votes not ok: each retry settles its accusation."""
    m = machine(min_peers=2, max_unconfirmed_reports=2)
    q = _voting(m, ["a", "b", "c"])
    for attempt in range(3):
        assert "a" in m.members
        _report(m, "a", "b", q, 0.1 + attempt)
        m.commit("b", "inc1", q.round, q.quorum_id, True, 0.2 + attempt)
        m.commit("a", "inc1", q.round, q.quorum_id, False, 0.3 + attempt, reason="b sent garbage (a lie)")
        q = _voting(m, ["a", "b", "c"], 0.4 + attempt) if "a" in m.members else None
        if q is None:
            break
    assert "a" not in m.members and "b" in m.members


def test_each_members_contribution_is_the_median_over_the_voters():
    m = machine(min_peers=3)
    q = _voting(m, ["a", "b", "c"])
    honest = {"a": (1.0, 1.0), "b": (1.2, 1.0), "c": (90.0, 0.02)}
    m.commit("a", "inc1", q.round, q.quorum_id, True, 0.1, contributions=honest)
    m.commit("b", "inc1", q.round, q.quorum_id, True, 0.2, contributions=honest)
    # c lies about itself (and names a stranger): one voter of three cannot move the medians
    lie = {"a": (1.0, 1.0), "b": (1.2, 1.0), "c": (1.1, 1.0), "zed": (5.0, 1.0)}
    m.commit("c", "inc1", q.round, q.quorum_id, True, 0.3, contributions=lie)
    assert m.committed_round == 1
    got = {pid: m.members[pid].contribution for pid in "abc"}
    assert got == {"a": (0, 1.0, 1.0), "b": (0, 1.2, 1.0), "c": (0, 90.0, 0.02)}
    assert m.status(0.4)["members"][2]["contribution"] == (0, 90.0, 0.02)


def test_reports_outside_the_voted_quorum_are_ignored_with_their_evidence():
    m = machine(min_peers=2)
    q = _voting(m, ["a", "b", "c"])
    assert m.report("a", "inc1", q.round, q.quorum_id + 5, "b", "x", 0.1, evidence="ff") is False
    ev = [e for e in m.drain_events() if e["event"] == "report_ignored"][0]
    assert ev["evidence"] == "ff" and ev["culprit"] == "b"


# ====================================================================== stateful test

PEERS = ("p0", "p1", "p2", "p3", "p4")
REGIONS = {"p0": "eu", "p1": "us", "p2": "eu", "p3": "ap", "p4": "us"}
SP = Params(min_peers=2, lease_timeout=5.0, heartbeat_interval=1.0, grace=1.0, commit_timeout=8.0, history=4)


class CheckedMachine(QuorumMachine):
    """Checks every quorum formation, at the moment it happens, against the forming rule."""

    def __init__(self, *args, **kw):
        self.formations: List[Tuple[float, QuorumInfo, Set[str]]] = []
        super().__init__(*args, **kw)

    def _try_form(self, now: float) -> None:
        expected = set(self._expected())
        before = self.voting
        super()._try_form(now)
        if self.voting is not None and self.voting is not before:
            q = self.voting.quorum
            ids = set(q.ids)
            assert len(ids) >= self.params.min_peers, (q, expected)
            assert 2 * len(ids) > len(expected), (q, expected)
            assert ids <= expected and ids <= set(self.members)
            for pid in expected | ids:
                assert now - self.members[pid].last_seen <= self.params.lease_timeout, (pid, now)
            assert q.round == self.committed_round
            assert list(q.ids) == sorted(q.ids, key=lambda p: (self.members[p].region, p))
            self.formations.append((now, q, expected))


@dataclass
class ModelPeer:
    pid: str
    inc: str
    round: int = 0
    joined: bool = False
    waiting_sync: Optional[int] = None  # round of a held Sync call
    quorum: Optional[QuorumInfo] = None  # the quorum it runs the outer step with
    waiting_commit: bool = False  # a held Commit call for ``quorum``
    old_incs: List[str] = field(default_factory=list)


class ProtocolMachine(RuleBasedStateMachine):
    """Random joins, heartbeats, syncs, votes, leaves, clock jumps and coordinator restarts.

    Each peer is modelled minimally (its round, a held call, the quorum it was given); the
    coordinator's snapshot is "persisted" after every step, and a restart rebuilds the machine
    from it. Safety is checked after every step, liveness at the end.
    """

    @initialize()
    def start(self):
        self.now = 0.0
        self.machine = CheckedMachine(SP)
        self.persisted = self.machine.snapshot()
        self.machine.dirty = False
        self.gen = 0
        self.peers: Dict[str, ModelPeer] = {p: ModelPeer(p, self._new_inc()) for p in PEERS}
        self.max_qid = 0
        self.max_round = 0
        self.committed: Dict[int, int] = {}  # round -> quorum id, from COMMIT answers and commit events
        self.commit_members: Dict[int, Tuple[str, ...]] = {}
        self.quorums: Dict[Tuple[int, int], Tuple[str, ...]] = {}  # (round, qid) -> members
        self.last_quorum_event: Optional[Tuple[int, int, Tuple[str, ...]]] = None
        self.votes: Dict[Tuple[int, int], Dict[str, bool]] = {}
        self.accusers: Dict[Tuple[int, str], Set[str]] = {}  # (quorum id, culprit) -> who reported it

    def _new_inc(self) -> str:
        self.gen += 1
        return f"inc{self.gen}"

    # ------------------------------------------------------------------ plumbing
    def _after_call(self):
        """What the service does after each call: hand answers to held calls, then check."""
        m = self.machine
        for pid in PEERS:  # after a call, nobody whose lease expired is still a member
            if pid in m.members:
                assert self.now - m.members[pid].last_seen <= SP.lease_timeout
        for p in self.peers.values():
            if p.waiting_sync is not None:
                a = m.take_sync_answer(p.pid, p.waiting_sync)
                if a is not None:
                    self._on_sync_answer(p, p.waiting_sync, a)
            if p.waiting_commit:
                q = p.quorum
                a = m.take_commit_answer(p.pid, q.round, q.quorum_id)
                if a is not None:
                    self._on_commit_answer(p, a)

    def _call(self, p: ModelPeer, fn, *args, **kw):
        try:
            return fn(*args, **kw), None
        except Refusal as r:
            if r.code == "PERMISSION_DENIED":
                p.joined = False
                p.waiting_sync = None
                p.waiting_commit = False
            return None, r

    def _on_sync_answer(self, p: ModelPeer, round: int, a: SyncAnswer):
        assert a.round == round
        p.waiting_sync = None
        if a.outcome is SyncOutcome.QUORUM:
            q = a.quorum
            assert p.pid in q.ids and q.round == round
            assert self.quorums.get((q.round, q.quorum_id), q.ids) == q.ids
            p.quorum, p.waiting_commit = q, False
        elif a.outcome is SyncOutcome.HEAL:
            d = a.donor
            assert d.peer_id != p.pid and d.round >= p.round
            p.round = d.round  # fetched S_d.round from the donor
            p.quorum, p.waiting_commit = None, False
        else:
            assert a.outcome is SyncOutcome.WAIT and a.donor is None

    def _on_commit_answer(self, p: ModelPeer, a: CommitAnswer):
        q = p.quorum
        assert (a.round, a.quorum_id) == (q.round, q.quorum_id)
        if a.decision is CommitDecision.COMMIT:
            assert self.committed.setdefault(a.round, a.quorum_id) == a.quorum_id, "round committed twice"
            p.round = max(p.round, a.round + 1)
        else:
            assert a.decision is CommitDecision.RETRY
            assert self.committed.get(a.round) != a.quorum_id, "a committed quorum was told to retry"
        p.quorum, p.waiting_commit = None, False

    # ------------------------------------------------------------------ rules
    @rule(i=st.integers(0, len(PEERS) - 1), fresh=st.booleans())
    def join(self, i, fresh):
        p = self.peers[PEERS[i]]
        inc = self._new_inc() if fresh else p.inc
        held = self.machine.members.get(p.pid)
        res, err = self._call(
            p,
            self.machine.join,
            p.pid,
            inc,
            f"{p.pid}.net:7000",
            SCHEMA,
            1,
            REGIONS[p.pid],
            p.round,
            H(p.round),
            self.now,
        )
        if err is not None:
            assert err.code == "ALREADY_EXISTS", err.message
            assert fresh and held is not None and held.incarnation == p.inc
            assert self.now - held.last_seen <= SP.lease_timeout
        else:
            if fresh:  # a new process of this peer: whatever the old one was doing is gone
                p.old_incs.append(p.inc)
                p.inc, p.quorum, p.waiting_sync, p.waiting_commit = inc, None, None, False
            p.joined = True
            assert res.committed_round == self.machine.committed_round
            if res.must_heal and res.donor is not None:
                assert res.donor.peer_id != p.pid and res.donor.peer_id in self.machine.members
                p.round = res.donor.round
                p.quorum, p.waiting_sync, p.waiting_commit = None, None, False
            elif not res.must_heal:
                assert p.round == self.machine.committed_round
        self._after_call()

    @rule(i=st.integers(0, len(PEERS) - 1))
    def heartbeat(self, i):
        p = self.peers[PEERS[i]]
        held = self.machine.members.get(p.pid)
        live = held is not None and held.incarnation == p.inc and self.now - held.last_seen <= SP.lease_timeout
        res, err = self._call(p, self.machine.heartbeat, p.pid, p.inc, self.now)
        assert (err is None) == live, err
        if err is None:
            assert res == (self.machine.committed_round, self.machine.quorum_id)
        self._after_call()

    @rule(i=st.integers(0, len(PEERS) - 1))
    def call_with_an_old_incarnation(self, i):
        p = self.peers[PEERS[i]]
        if not p.old_incs:
            return
        with pytest.raises(Refusal) as e:
            self.machine.heartbeat(p.pid, p.old_incs[-1], self.now)
        assert e.value.code == "PERMISSION_DENIED"
        self._after_call()

    @rule(dt=st.sampled_from([0.1] * 6 + [0.3, 0.6, 1.0, 2.0, 4.0, 5.5, 9.0]))
    def advance_time(self, dt):
        self.now += dt

    def _act(self, p: ModelPeer):
        """What a healthy peer does next: join, vote ok for its quorum, or sync its round.

        A held call that got no answer yet is made again, as the client does after WAIT.
        """
        i = PEERS.index(p.pid)
        if not p.joined:
            self.join(i, False)
        elif p.quorum is not None:
            self.commit(i, True)
        else:
            self.sync(i, False)

    @rule(i=st.integers(0, len(PEERS) - 1))
    def act(self, i):
        self._act(self.peers[PEERS[i]])

    @rule(n=st.integers(2, len(PEERS)), steps=st.integers(1, 8))
    def the_first_n_peers_make_progress(self, n, steps):
        """A stretch of healthy operation: the first n peers act in turn, 0.2 s apart."""
        for _ in range(steps):
            for pid in PEERS[:n]:
                self._act(self.peers[pid])
            self.now += 0.2

    @rule(i=st.integers(0, len(PEERS) - 1), wrong=st.sampled_from([False] * 6 + [True]))
    def sync(self, i, wrong):
        p = self.peers[PEERS[i]]
        if not p.joined:
            return
        r = p.round
        p.quorum, p.waiting_commit = None, False  # a peer syncing again gives up on its quorum
        res, err = self._call(p, self.machine.sync, p.pid, p.inc, r, f"bad-{p.pid}" if wrong else H(r), self.now)
        if err is not None:
            assert err.code == "PERMISSION_DENIED", err.message
        elif res is None:
            p.waiting_sync = r
        else:
            self._on_sync_answer(p, r, res)
        self._after_call()

    @rule(i=st.integers(0, len(PEERS) - 1), ok=st.sampled_from([True] * 5 + [False]))
    def commit(self, i, ok):
        p = self.peers[PEERS[i]]
        q = p.quorum
        if q is None:
            return
        res, err = self._call(p, self.machine.commit, p.pid, p.inc, q.round, q.quorum_id, ok, self.now)
        if err is None:
            self.votes.setdefault((q.round, q.quorum_id), {})[p.pid] = ok
        if err is not None:
            assert err.code in ("ABORTED", "PERMISSION_DENIED"), err.message
            if q.round >= self.machine.committed_round - SP.history:  # still in the history: idempotent
                assert self.committed.get(q.round) != q.quorum_id
            p.quorum, p.waiting_commit = None, False
        elif res is None:
            p.waiting_commit = True
        else:
            self._on_commit_answer(p, res)
        self._after_call()

    @rule(i=st.integers(0, len(PEERS) - 1), j=st.integers(0, len(PEERS) - 1))
    def accuse(self, i, j):
        """A member accuses another member of its quorum (rightly or not) with some evidence."""
        p, culprit = self.peers[PEERS[i]], PEERS[j]
        q = p.quorum
        if q is None:
            return
        res, err = self._call(
            p, self.machine.report, p.pid, p.inc, q.round, q.quorum_id, culprit, "test", self.now, evidence="ab" * 8
        )
        if err is not None:
            assert err.code == "PERMISSION_DENIED", err.message
        self._after_call()

    @rule(i=st.integers(0, len(PEERS) - 1))
    def give_up_waiting(self, i):
        """A held call times out on the peer's side (the peer calls again later)."""
        p = self.peers[PEERS[i]]
        p.waiting_sync = None
        p.waiting_commit = False

    @rule(i=st.integers(0, len(PEERS) - 1))
    def leave(self, i):
        p = self.peers[PEERS[i]]
        self.machine.leave(p.pid, p.inc, self.now, reason="test")
        assert p.pid not in self.machine.members or self.machine.members[p.pid].incarnation != p.inc
        p.joined, p.quorum, p.waiting_sync, p.waiting_commit = False, None, None, False
        self._after_call()

    @rule()
    def poll(self):
        self.machine.poll(self.now)
        self._after_call()

    @rule()
    def restart_coordinator(self):
        self._check_events()
        old = self.machine
        self.machine = CheckedMachine(SP, snapshot=json.loads(json.dumps(self.persisted)))
        assert (self.machine.committed_round, self.machine.quorum_id, self.machine.schema_hash) == (
            old.committed_round,
            old.quorum_id,
            old.schema_hash,
        )
        assert [(r.round, r.quorum_id) for r in self.machine.history] == [(r.round, r.quorum_id) for r in old.history]
        assert not self.machine.members and not self.machine.dirty
        for p in self.peers.values():  # held calls fail; peers keep their state and their quorum
            p.joined, p.waiting_sync, p.waiting_commit = False, None, False

    def teardown(self):
        # liveness after any history: when every peer behaves (joins again, syncs, votes ok, calls
        # again while held), the next round commits within a lease, a commit timeout and a grace
        start, t0 = self.machine.committed_round, self.now
        limit = SP.lease_timeout + SP.commit_timeout + SP.grace + 5.0
        while self.machine.committed_round == start:
            assert self.now - t0 <= limit, f"no commit within {limit}s of healthy operation"
            for pid in PEERS:
                self._act(self.peers[pid])
            self.protocol_is_safe()
            self.now += 0.25
        n = len(self.commit_members)
        event(f"rounds committed: {'0' if n == 0 else '1-3' if n < 4 else '4+'}")
        event(f"quorums formed: {'<5' if len(self.quorums) < 5 else '5+'}")

    # ------------------------------------------------------------------ invariants
    def _check_events(self):
        for ev in self.machine.drain_events():
            if ev["event"] == "quorum":
                key, ids = (ev["round"], ev["quorum_id"]), tuple(ev["members"])
                assert key not in self.quorums, f"quorum {key} formed twice"
                last = self.last_quorum_event
                if last is not None:
                    assert ev["quorum_id"] >= last[1], "quorum ids went down"
                    if ev["quorum_id"] == last[1]:  # kept: only after a commit with the same members
                        assert self.committed.get(last[0]) == last[1] and ev["round"] == last[0] + 1
                        assert ids == last[2]
                self.quorums[key] = ids
                self.last_quorum_event = (ev["round"], ev["quorum_id"], ids)
            elif ev["event"] == "commit":
                r, qid, ids = ev["round"], ev["quorum_id"], tuple(ev["members"])
                assert self.committed.setdefault(r, qid) == qid, "round committed twice"
                assert r not in self.commit_members, "round committed twice"
                assert ids == self.quorums[(r, qid)], "commit does not cover the quorum"
                votes = self.votes.get((r, qid), {})
                assert all(votes.get(pid) is True for pid in ids), (r, qid, votes)
                assert r == 0 or (r - 1) in self.commit_members, "rounds commit in order"
                self.commit_members[r] = ids
            elif ev["event"] == "retry":
                assert self.committed.get(ev["round"]) != ev["quorum_id"]
            elif ev["event"] == "report":
                self.accusers.setdefault((ev["quorum_id"], ev["culprit"]), set()).add(ev["peer_id"])
            elif ev["event"] == "exclude" and "reported by" in ev["reason"]:
                # one member's word is never enough: a second accuser, or the culprit's own failed vote
                pid = ev["peer_id"]
                confirmed = [key for key, who in self.accusers.items() if key[1] == pid and len(who) >= 2]
                failed = [key for key, votes in self.votes.items() if votes.get(pid) is False]
                assert confirmed or failed, (pid, self.accusers, ev)

    @invariant()
    def protocol_is_safe(self):
        m = self.machine
        self._check_events()
        assert m.quorum_id >= self.max_qid, "quorum id went down"
        self.max_qid = m.quorum_id
        assert m.committed_round >= self.max_round, "a committed round was undone"
        self.max_round = m.committed_round
        assert set(self.commit_members) == set(range(m.committed_round))
        assert [r.round for r in m.history] == list(range(max(0, m.committed_round - SP.history), m.committed_round))
        for r in m.history:
            assert self.committed[r.round] == r.quorum_id and tuple(r.members) == self.commit_members[r.round]
        for p in self.peers.values():
            assert p.round <= m.committed_round
        if m.voting is not None:
            assert set(m.voting.quorum.ids) <= set(m.members)
            assert m.voting.quorum.round == m.committed_round
        assert m._expected() <= set(m.members)
        # persisted before any answer leaves: dirty must flag every change of the snapshot
        snap = m.snapshot()
        if snap != self.persisted:
            assert m.dirty, (snap, self.persisted)
        self.persisted, m.dirty = snap, False


ProtocolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProtocol = ProtocolMachine.TestCase


# ---------------------------------------------------------------- balanced rounds, adaptive grace


def test_the_quorum_carries_each_members_work_and_its_next_assignment():
    m = machine(min_peers=2)
    plan = WorkPlan(sync_every=40, min_steps=8, balanced=True)
    for pid in ("a", "b", "c"):
        m.join(pid, "inc1", f"{pid}.example:7000", SCHEMA, 1, "", 0, H(0), 0.0, plan=plan)
    m.sync("a", "inc1", 0, H(0), 0.1, step_rate=10.0, steps=40, samples=40 * 64)
    m.sync("b", "inc1", 0, H(0), 0.1, step_rate=5.0, steps=40, samples=40 * 32)
    ans = m.sync("c", "inc1", 0, H(0), 0.2, step_rate=1.0, steps=40, samples=40 * 64)
    q = ans.quorum
    work = dict(zip(q.ids, q.work))
    assert work == {"a": (40, 2560, 40, 10.0), "b": (40, 1280, 20, 5.0), "c": (40, 2560, 0, 1.0)}
    assert m.drain_events()[-1]["next_steps"] == {"a": 40, "b": 20, "c": 0}


def test_fixed_plans_assign_h_whatever_the_rates():
    m = machine()
    m.join("a", "inc1", "a.example:7000", SCHEMA, 1, "", 0, H(0), 0.0, plan=WorkPlan(25, 1, False))
    ans = m.sync("a", "inc1", 0, H(0), 0.1, step_rate=0.01, steps=25, samples=25)
    assert ans.quorum.work == ((25, 25, 25, 0.01),)


@pytest.mark.parametrize(
    "bad", [dict(step_rate=-1.0), dict(step_rate=float("nan")), dict(steps=-1), dict(samples=-5), dict(step_rate=1e12)]
)
def test_bad_work_reports_are_refused(bad):
    m = machine()
    join(m, "a")
    refused("INVALID_ARGUMENT", m.sync, "a", "inc1", 0, H(0), 0.1, **bad)


def test_the_grace_window_follows_how_late_members_arrive():
    """b arrives 3 s after the first sync of every round. The fixed grace (1 s) commits each round without
    it (it heals and is late again); the adaptive grace grows to wait for it (twice the moving average of
    the spread) from the second round on, never past the cap, and shrinks back once members arrive
    together."""
    m = machine(min_peers=1, grace=1.0, grace_cap=5.0, lease_timeout=1e6)
    fixed = machine(min_peers=1, grace=1.0, adaptive_grace=False, lease_timeout=1e6)
    members = {id(m): [], id(fixed): []}
    for mm in (m, fixed):
        for pid in ("a", "b", "c"):
            join(mm, pid)
    t = 0.0
    for r in range(4):
        for mm in (m, fixed):
            mm.sync("a", "inc1", r, H(r), t)
            mm.sync("c", "inc1", r, H(r), t)
            mm.poll(t + 2.5)
            mm.sync("b", "inc1", r, H(r), t + 3.0)
            mm.poll(t + 3.0)
            q = mm.voting.quorum
            members[id(mm)].append(set(q.ids))
            commit_all(mm, q, t + 3.1)
        t += 10.0
    assert members[id(fixed)] == [{"a", "c"}] * 4
    assert members[id(m)] == [{"a", "c"}] + [{"a", "b", "c"}] * 3
    assert fixed.grace() == 1.0 and 3.0 < m.grace() <= 5.0
    for _ in range(10):  # together again: the window shrinks toward grace_s
        full_round(m, ["a", "b", "c"], t)
        t += 10.0
    assert m.grace() < 1.5


def test_a_healer_is_assigned_its_steps_from_its_rate():
    """A slow member that missed a quorum heals with an assignment for the round it enters (not a full H)."""
    m = machine(min_peers=1, lease_timeout=1e6)
    plan = WorkPlan(sync_every=20, min_steps=2, balanced=True)
    for pid in ("a", "b", "c"):
        m.join(pid, "inc1", f"{pid}.example:7000", SCHEMA, 1, "", 0, H(0), 0.0, plan=plan)
    m.sync("a", "inc1", 0, H(0), 0.1, step_rate=10.0, steps=20, samples=20)
    m.sync("c", "inc1", 0, H(0), 0.1, step_rate=10.0, steps=20, samples=20)
    m.poll(5.0)  # the grace window passes without b: a and c form round 0 and commit it
    q = m.voting.quorum
    assert set(q.ids) == {"a", "c"}
    commit_all(m, q, 5.1)
    late = m.sync("b", "inc1", 0, H(0), 5.2, step_rate=2.5, steps=20, samples=20)
    assert late.outcome is SyncOutcome.HEAL and late.next_steps == 5  # 20 * 2.5 / 10
    other = m.sync("b", "inc1", 1, H(1), 5.3)  # healed; then syncs without a rate yet (a restarted peer)
    assert other is None or other.outcome is not SyncOutcome.HEAL
    m.members["b"].step_rate = 0.0
    assert m._healer_steps("b") is None  # no rate: the healer trains H
