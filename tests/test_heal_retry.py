"""A joiner's state download: parallel byte ranges, and a corrupt, truncated or stalled donor retried elsewhere."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.comm.peer_service import PeerServicer, serve_peer
from dtrain.comm.state_download import StateTransferError, fetch_state
from dtrain.control.client import DonorInfo, HealOrder
from dtrain.outer.global_state import GlobalState
from dtrain.peer.round_engine import RoundEngine
from dtrain.wire.outcomes import RoundOutcome
from dtrain.wire.snapshot import StateSnapshot

from conftest import stop_servers

SCHEMA = "s" * 64


def good_state(round_: int = 5, n: int = 300_000) -> GlobalState:
    g = torch.Generator().manual_seed(round_)
    return GlobalState(
        [("theta", torch.randn(n, generator=g)), ("velocity", torch.randn(n, generator=g))], round=round_
    )


@settings(max_examples=12, deadline=None)
@given(n=st.integers(0, 5000), chunk=st.integers(1, 700), streams=st.integers(1, 9))
def test_parallel_ranges_reassemble_any_payload(n, chunk, streams):
    data = bytes((i * 7 + n) % 251 for i in range(n))
    svc = PeerServicer(SCHEMA, "d", chunk_bytes=chunk)
    svc.set_snapshot(StateSnapshot(3, data))
    server, port = serve_peer(svc)
    try:
        got = fetch_state(f"127.0.0.1:{port}", SCHEMA, streams=streams, timeout=20)
    finally:
        stop_servers([server])
    assert got.payload == data and got.round == 3


class CorruptServicer(PeerServicer):
    """Advertises the true hash but flips a byte in the middle of what it streams."""

    def StreamState(self, request, context):
        for chunk in super().StreamState(request, context):
            if chunk.offset <= len(self.snapshot.payload) // 2 < chunk.offset + len(chunk.data):
                data = bytearray(chunk.data)
                data[len(self.snapshot.payload) // 2 - chunk.offset] ^= 0xFF
                chunk.data = bytes(data)
            yield chunk


class TruncatingServicer(PeerServicer):
    """Ends every stream after its first chunk (a donor dying mid-transfer)."""

    def StreamState(self, request, context):
        for chunk in super().StreamState(request, context):
            yield chunk
            return


class StallingServicer(PeerServicer):
    """Sends one chunk, then nothing (a SIGSTOPped donor)."""

    def StreamState(self, request, context):
        for i, chunk in enumerate(super().StreamState(request, context)):
            if i == 1:
                time.sleep(30)
            yield chunk


class ScriptedClient:
    """The coordinator's answers to a healer's syncs: one donor after another."""

    def __init__(self, donors):
        self.donors, self.syncs = list(donors), 0

    def sync(self, round, state_hash, timeout=None, report=None):
        self.syncs += 1
        d = self.donors.pop(0)
        return HealOrder(d, d.round, "behind")


@pytest.mark.timeout(90)
def test_heal_retries_other_donors_after_corrupt_truncated_and_stalled_transfers(served):
    truth = good_state()
    addresses = {}
    for name, cls in (
        ("corrupt", CorruptServicer),
        ("truncating", TruncatingServicer),
        ("stalling", StallingServicer),
        ("good", PeerServicer),
    ):
        svc = cls(SCHEMA, name, chunk_bytes=64 << 10)
        svc.set_snapshot(truth.snapshot())
        addresses[name] = served(svc)
    donors = [
        DonorInfo(n, addresses[n], truth.round, truth.hash()) for n in ("corrupt", "truncating", "stalling", "good")
    ]
    client = ScriptedClient(donors)
    mine = good_state(round_=1)
    published = []
    engine = RoundEngine(
        client, None, mine, lambda: published.append(mine.hash()), "joiner", SCHEMA, transfer_timeout_s=20
    )
    # a short stall limit so the stalled donor is given up quickly
    import dtrain.peer.round_engine as re_mod

    orig = re_mod.fetch_state
    re_mod.fetch_state = lambda *a, **k: orig(*a, chunk_timeout=2.0, **k)
    try:
        t0 = time.monotonic()
        out = engine.exchange(torch.zeros(10))
    finally:
        re_mod.fetch_state = orig
    assert out.outcome is RoundOutcome.HEAL and out.heal is not None and out.heal.donor == "good"
    assert client.syncs == 4  # three failed downloads, each followed by a new sync (a new donor)
    assert mine.hash() == truth.hash() and mine.round == truth.round
    assert published == [truth.hash()]  # published once, after the good download
    assert time.monotonic() - t0 < 30


def test_fetch_reports_each_failure_clearly(served):
    truth = good_state(n=50_000)
    for cls, pattern in ((CorruptServicer, "hash mismatch"), (TruncatingServicer, "truncated")):
        svc = cls(SCHEMA, "d", chunk_bytes=32 << 10)
        svc.set_snapshot(truth.snapshot())
        with pytest.raises(StateTransferError, match=pattern):
            fetch_state(served(svc), SCHEMA, streams=3, timeout=20)


def test_a_donor_whose_state_is_not_the_committed_one_is_refused(served):
    """A donor serving a self-consistent state that is not the S_R the coordinator recorded (a forked or
    stale peer) is not adopted: the healer asks again and takes the next donor's state."""
    truth, forged = good_state(round_=4, n=20_000), good_state(round_=4, n=20_000)
    forged.replace({"theta": forged.tensors["theta"] + 1, "velocity": forged.tensors["velocity"]}, round=4)
    addresses = {}
    for name, state in (("forked", forged), ("good", truth)):
        svc = PeerServicer(SCHEMA, name, chunk_bytes=8 << 10)
        svc.set_snapshot(state.snapshot())
        addresses[name] = served(svc)
    client = ScriptedClient([DonorInfo(n, addresses[n], 4, truth.hash()) for n in ("forked", "good")])
    mine = good_state(round_=1, n=20_000)
    engine = RoundEngine(client, None, mine, lambda: None, "joiner", SCHEMA, transfer_timeout_s=20)
    out = engine.exchange(torch.zeros(10))
    assert out.outcome is RoundOutcome.HEAL and out.heal is not None and out.heal.donor == "good"
    assert client.syncs == 2 and mine.hash() == truth.hash()
