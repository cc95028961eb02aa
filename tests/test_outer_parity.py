"""Bit parity of the DiLoCo outer loop across real peer processes (``dtrain.sim.model_free_peer``).

Every codec x backend combination, with and without streaming fragments, with
error feedback, k = 3 and k = 4: every round committed by several peers has
ONE state hash, and the coordinator's commit records agree with the peers'.
"""

from __future__ import annotations

import pytest

from outer_fixtures import ALL_CODECS, check_against_coordinator, check_parity, peer_flags


def _run(cl, n_peers: int, rounds: int, **flag_args):
    coord = cl.start_coordinator(min_peers=n_peers)
    flags = peer_flags(**flag_args, extra=["--error-feedback", "--wait-peers", str(n_peers)])
    peers = [cl.start_peer(f"p{i}", rounds, *flags) for i in range(n_peers)]
    codes = cl.wait_exit(peers, 40.0)
    assert codes == [0] * n_peers, [p.stderr()[-1500:] for p in peers]
    return coord, peers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fragments", [1, 3], ids=["whole", "streaming3"])
def test_every_codec_and_backend_commits_one_state_hash(outer_cluster, forkserver, fragments):
    rounds = 2 * len(ALL_CODECS)  # round r: codec r mod 5, backend (r div 5) mod 2, fragment r mod F
    coord, peers = _run(
        outer_cluster, 3, rounds, codecs=",".join(ALL_CODECS), backends="grpc,gloo", fragments=fragments, numel=3000
    )
    ids = sorted(p.peer_id for p in peers)
    combos = set()
    for p in peers:
        recs = p.rounds()
        assert sorted(recs) == list(range(rounds)), f"{p.peer_id} committed rounds {sorted(recs)}"
        for r, rec in recs.items():
            assert sorted(rec["members"]) == ids, f"round {r} committed by {rec['members']}, not all peers"
            assert rec["attempts"] == 1, f"{p.peer_id} round {r} needed {rec['attempts']} attempts"
            assert rec["fragment"] == r % fragments
            assert rec["bytes_sent"] > 0 and rec["bytes_recv"] > 0
            combos.add((rec["codec"], rec["backend"]))
    assert combos == {(c, b) for c in ALL_CODECS for b in ("grpc", "gloo")}
    hashes = check_parity(peers)
    assert len(set(hashes.values())) == rounds, "every committed round must change the state"
    commits = check_against_coordinator(coord, peers)
    assert sorted(commits) == list(range(rounds))
    assert all(sorted(e["members"]) == ids for e in commits.values())
    assert not coord.events("retry") and not coord.events("exclude")


@pytest.mark.timeout(60)
def test_four_peers_have_parity_on_both_backends(outer_cluster, forkserver):
    rounds = 4  # one codec: backends alternate grpc, gloo, grpc, gloo
    coord, peers = _run(outer_cluster, 4, rounds, codecs="int8", backends="grpc,gloo", fragments=1, numel=3001)
    for p in peers:
        recs = p.rounds()
        assert sorted(recs) == list(range(rounds))
        assert [recs[r]["backend"] for r in range(rounds)] == ["grpc", "gloo", "grpc", "gloo"]
        assert all(len(rec["members"]) == 4 for rec in recs.values())
    check_parity(peers)
    check_against_coordinator(coord, peers)
