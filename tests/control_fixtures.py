"""Helpers for control-plane integration tests: a real coordinator process and model-free peers without a
data plane (``dtrain.sim.model_free_peer --backends none``).

Those peers run the real peer lifecycle, round protocol and outer step on a
GlobalState, but exchange nothing: every member's pseudo-gradient is the same
function of the seed and the round, so their states must still agree bit for
bit round after round (parity) while the tests stay light. The data plane is
tested in ``test_outer_parity.py`` / ``test_outer_faults.py``.

Processes are forked from the torch-preloaded forkserver of ``proc_fixtures``
(the ``cluster`` fixture warms it up), and every one of them is killed by PID
at teardown, whatever the test did. Timings are tiny so that the whole suite
stays fast on two cores.
"""

from __future__ import annotations

from typing import Optional

import pytest

from proc_fixtures import Cluster as _Cluster
from proc_fixtures import Peer, check_chain, check_parity, read_jsonl, wait_for, warm_forkserver  # noqa: F401

FAST = dict(lease_timeout_s=1.5, heartbeat_interval_s=0.3, grace_s=0.3, commit_timeout_s=3.0, max_wait_s=2.0)
NUMEL = 8192  # theta and velocity: a 64 KiB state
STATE_BYTES = 8 * NUMEL


class Cluster(_Cluster):
    coordinator_params = FAST

    def start_peer(
        self, peer_id: str, rounds: int, *extra: str, step_s: float = 0.05, out: Optional[str] = None
    ) -> Peer:
        """A control-plane peer: ``--backends none``, ``--numel NUMEL``; ``extra`` flags come last (they win)."""
        flags = ["--backends", "none", "--numel", str(NUMEL), "--step-s", str(step_s), "--join-timeout", "60", *extra]
        return super().start_peer(peer_id, rounds, *flags, out=out)


@pytest.fixture
def cluster(tmp_path):
    warm_forkserver()
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()
