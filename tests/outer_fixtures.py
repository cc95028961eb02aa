"""Helpers for outer-loop integration tests: a coordinator (gloo_store=true) and ``dtrain.sim.model_free_peer``
peers with a data plane (grpc / gloo collectives).

Processes are forked from the torch-preloaded forkserver of ``proc_fixtures``
(the ``forkserver`` fixture warms it up); every process is started through an
:class:`OuterCluster`, which kills it by PID at teardown (the ``outer_cluster``
fixture), whatever the test did. Faults are injected through the test suite's
fault plugin (``fault_plugin``): :func:`fault_env` is the environment that
loads it with its settings, passed to ``start_peer(..., env=...)``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import pytest

import fault_plugin
from proc_fixtures import Cluster, Coordinator, Peer, check_parity  # noqa: F401 (check_parity: re-exported)

# coordinator parameters: quick leases, short grace, gloo store on
COORD = dict(
    lease_timeout_s=1.5, heartbeat_interval_s=0.3, grace_s=0.3, commit_timeout_s=4.0, max_wait_s=2.0, gloo_store="true"
)
ALL_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")


def fault_env(**settings) -> Dict[str, str]:
    """``DTRAIN_FAULT_PLUGIN`` = the test suite's plugin, and its settings: ``poison_round=2`` ->
    ``DTRAIN_FAULT_POISON_ROUND=2`` (see ``fault_plugin``)."""
    return {
        "DTRAIN_FAULT_PLUGIN": fault_plugin.PLUGIN,
        **{f"DTRAIN_FAULT_{k.upper()}": str(v) for k, v in settings.items()},
    }


class OuterCluster(Cluster):
    coordinator_params = COORD

    @property
    def rounds_file(self) -> str:
        """Pass ``--rounds-file`` this path; :meth:`finish` writes the round at which every peer stops."""
        return os.path.join(self.dir, "rounds")

    def finish(self, peers: Sequence[Peer], more: int = 2, timeout: float = 20.0) -> int:
        """Stop ``peers`` (started with ``--rounds-file``) at one round boundary, ``more`` rounds past the
        furthest of them; asserts they all exit 0 there. Returns that round."""
        stop = max(p.held_round() for p in peers) + more
        tmp = self.rounds_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{stop}\n")
        os.replace(tmp, self.rounds_file)
        codes = self.wait_exit(peers, timeout)
        assert codes == [0] * len(peers), {p.peer_id: (c, p.stderr()[-1500:]) for p, c in zip(peers, codes)}
        for p in peers:
            done = p.records("done")
            assert done and done[-1]["round"] == stop, f"{p.peer_id} stopped at {done}, not round {stop}"
        return stop


@pytest.fixture
def outer_cluster(tmp_path):
    c = OuterCluster(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


# ---------------------------------------------------------------- checks


def check_against_coordinator(coord: Coordinator, peers: Sequence[Peer]) -> Dict[int, dict]:
    """The coordinator's commit events agree with the peers' round records; returns round -> commit event.

    A commit event of round r carries the quorum's reference hash of S_r, i.e. the hash a peer recorded
    after committing round r - 1; its quorum id and members are those of every peer that committed r.
    """
    commits: Dict[int, dict] = {}
    for e in coord.events("commit"):
        assert e["round"] not in commits, f"the coordinator committed round {e['round']} twice: {e}"
        commits[e["round"]] = e
    assert sorted(commits) == list(range(len(commits))), f"committed rounds have gaps: {sorted(commits)}"
    hashes = check_parity(peers)
    for r, e in commits.items():
        if r - 1 in hashes:
            assert e["state_hash"] == hashes[r - 1], (
                f"round {r}: coordinator says S_{r} is {e['state_hash'][:12]}, peers {hashes[r - 1][:12]}"
            )
    for p in peers:
        for r, rec in p.rounds().items():
            e = commits.get(r)
            assert e is not None, f"{p.peer_id} committed round {r}, the coordinator did not"
            assert (rec["quorum_id"], rec["members"]) == (e["quorum_id"], e["members"]), (
                f"{p.peer_id} round {r}: quorum {rec['quorum_id']} {rec['members']}, coordinator "
                f"{e['quorum_id']} {e['members']}"
            )
            assert p.peer_id in e["members"]
    return commits


def peer_flags(
    *,
    codecs: str = "fp32",
    backends: str = "grpc",
    fragments: int = 1,
    numel: int = 4000,
    deadline_s: float = 5.0,
    extra: Sequence[str] = (),
) -> List[str]:
    return [
        "--codecs",
        codecs,
        "--backends",
        backends,
        "--fragments",
        str(fragments),
        "--numel",
        str(numel),
        "--deadline-s",
        str(deadline_s),
        "--sync-timeout-s",
        "30",
        "--join-timeout",
        "30",
        *extra,
    ]
