"""Units of the local simulation: WAN emulator links, the seeded chaos schedule, the run judge."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import ChaosConfig, WanConfig
from dtrain.sim.chaos import build_schedule
from dtrain.sim.summary import summarize
from dtrain.sim.wan import LinkSpec, WanEmulator

# ---------------------------------------------------------------- WAN emulator


class EchoSink:
    """A TCP server that counts bytes and answers each b'?' with b'!'."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = 0
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        while True:
            try:
                data = c.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            if data.endswith(b"?"):
                c.sendall(b"!")

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def connect_via(proxy_url: str, target: str) -> socket.socket:
    host, port = proxy_url.rsplit("//", 1)[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


@pytest.fixture
def wan():
    spec = {
        ("eu", "us"): LinkSpec(latency_ms=60, bandwidth_mbit=40),
        ("us", "eu"): LinkSpec(latency_ms=60, bandwidth_mbit=40),
    }
    w = WanEmulator(lambda a, b: spec.get((a, b), LinkSpec()), seed=0, buffer_bytes=1 << 20)
    sink = EchoSink()
    urls = {"a": w.add_node("a", "eu"), "c": w.add_node("c", "eu")}
    w.add_node("b", "us")
    w.register("b", sink.address)
    try:
        yield w, sink, urls
    finally:
        w.close()
        sink.close()


@pytest.mark.timeout(60)
def test_wan_link_adds_latency_and_limits_bandwidth(wan):
    w, sink, urls = wan
    s = connect_via(urls["a"], sink.address)
    t0 = time.monotonic()
    s.sendall(b"?")
    assert s.recv(1) == b"!"
    rtt = time.monotonic() - t0
    assert 0.11 <= rtt < 1.0, rtt  # two one-way latencies of 60 ms
    payload = b"x" * (2 << 20)  # 2 MiB at 40 Mbit/s: 0.42 s on the wire
    t0 = time.monotonic()
    s.sendall(payload + b"?")
    assert s.recv(1) == b"!"
    took = time.monotonic() - t0
    ideal = len(payload) * 8 / 40e6
    assert ideal <= took < ideal * 1.6 + 0.5, (took, ideal)
    assert w.link_bytes()["a<->b"] >= len(payload)
    s.close()


@pytest.mark.timeout(60)
def test_wan_same_region_link_is_fast_and_reset_sends_rst(wan):
    w, sink, urls = wan
    w.register("c2", "127.0.0.1:1")  # an address nobody listens on: CONNECT fails cleanly
    s = connect_via(urls["a"], sink.address)
    s.sendall(b"?")
    assert s.recv(1) == b"!"
    assert w.reset("a", "b") == 1
    with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError, OSError)):
        for _ in range(50):
            s.sendall(b"y" * 1024)
            if not s.recv(1):
                raise ConnectionResetError("closed")
            time.sleep(0.01)
    s.close()


@pytest.mark.timeout(60)
def test_wan_stall_holds_delivery(wan):
    w, sink, urls = wan
    s = connect_via(urls["a"], sink.address)
    s.sendall(b"?")
    assert s.recv(1) == b"!"
    w.stall("a", "b", 1.0)
    t0 = time.monotonic()
    s.sendall(b"?")
    assert s.recv(1) == b"!"
    assert time.monotonic() - t0 >= 0.9
    s.close()


# ---------------------------------------------------------------- chaos schedule


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31), lo=st.floats(0.1, 5), span=st.floats(0, 5), joins=st.lists(st.floats(0, 50), max_size=4)
)
def test_chaos_schedule_is_seeded_sorted_and_within_bounds(seed, lo, span, joins):
    c = ChaosConfig(seed=seed, kill_every_s=[lo, lo + span], join_at_s=joins)
    w = WanConfig(reset_every_s=[lo, lo + span])
    a, b = build_schedule(c, w, 60.0), build_schedule(c, w, 60.0)
    assert a == b and [x.kind for x in a] == [x.kind for x in b]
    assert [x.t for x in a] == sorted(x.t for x in a)
    kills = [x.t for x in a if x.kind == "kill"]
    gaps = [y - x for x, y in zip([0.0] + kills, kills)]
    assert all(lo - 1e-2 <= g <= lo + span + 1e-2 for g in gaps)
    assert all(t <= 60.0 for t in kills)
    assert sorted(x.t for x in a if x.kind == "join") == sorted(round(j, 3) for j in joins)
    other = build_schedule(ChaosConfig(seed=seed + 1, kill_every_s=[lo, lo + span]), w, 60.0)
    if span > 0.5 and len(kills) > 2:
        assert [x.t for x in other if x.kind == "kill"] != kills


def test_chaos_config_refuses_bad_values():
    from dtrain.config import ConfigError, SimSizeConfig

    with pytest.raises(ConfigError, match=r"sim.peers"):
        SimSizeConfig(peers=0)
    with pytest.raises(ConfigError, match=r"sim.nproc_per_peer"):
        SimSizeConfig(nproc_per_peer=[2, 0])
    with pytest.raises(ConfigError, match=r"wan.latency_ms"):
        WanConfig(latency_ms=-1)

    with pytest.raises(ConfigError, match=r"chaos.signal"):
        ChaosConfig(signal="HUP")
    with pytest.raises(ConfigError, match=r"chaos.kill_every_s"):
        ChaosConfig(kill_every_s=[5, 2])
    with pytest.raises(ConfigError, match=r"wan.pairs"):
        WanConfig(pairs={"eu": [1, 0, 1]})
    with pytest.raises(ConfigError, match=r"wan.pairs.eu-us"):
        WanConfig(pairs={"eu-us": [1, 0]})


# ---------------------------------------------------------------- the judge


def write_run(tmp_path, peers: dict, commits: list, committed: int):
    for pid, recs in peers.items():
        d = tmp_path / f"peer-{pid}"
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut by a ki')
    c = tmp_path / "coordinator"
    c.mkdir()
    (c / "events.jsonl").write_text("".join(json.dumps({"event": "commit", **x}) + "\n" for x in commits))
    (c / "state.json").write_text(json.dumps({"committed_round": committed}))
    (tmp_path / "events.jsonl").write_text(json.dumps({"event": "kill", "signal": "KILL"}) + "\n")


def rnd(r, h, **kw):
    return {"kind": "round", "round": r, "state_hash": h, "attempts": 1, **kw}


def test_summary_passes_a_consistent_run(tmp_path):
    write_run(
        tmp_path,
        {
            "p0": [rnd(0, "h1"), rnd(1, "h2")],
            "p1": [rnd(0, "h1"), {"kind": "heal", "round": 2, "state_hash": "h2", "bytes": 10}],
        },
        [{"round": 0, "quorum_id": 1, "state_hash": "h0"}, {"round": 1, "quorum_id": 1, "state_hash": "h1"}],
        2,
    )
    s = summarize(str(tmp_path), 2)
    assert s["ok"] and s["parity"] and s["rounds_lost"] == 0 and s["heals"] == 1
    assert s["faults"] == {"kill_kill": 1}


@pytest.mark.parametrize("case", ["peers_disagree", "heal_mismatch", "coordinator_mismatch", "unrecorded", "short"])
def test_summary_flags_every_violation(tmp_path, case):
    peers = {"p0": [rnd(0, "h1"), rnd(1, "h2")], "p1": [rnd(0, "h1"), rnd(1, "h2")]}
    commits = [{"round": 0, "quorum_id": 1, "state_hash": "h0"}, {"round": 1, "quorum_id": 1, "state_hash": "h1"}]
    committed, target = 2, 2
    if case == "peers_disagree":
        peers["p1"][1] = rnd(1, "hX")
    elif case == "heal_mismatch":
        peers["p1"].append({"kind": "heal", "round": 2, "state_hash": "hY"})
    elif case == "coordinator_mismatch":
        commits[1]["state_hash"] = "hZ"
    elif case == "unrecorded":
        commits.append({"round": 2, "quorum_id": 2, "state_hash": "h2"})
        committed = 3
    else:
        target = 5
    write_run(tmp_path, peers, commits, committed)
    s = summarize(str(tmp_path), target)
    assert not s["ok"]
    if case == "unrecorded":
        assert s["rounds_lost"] == 1 and s["unrecorded_commits"] == [2]
    elif case == "short":
        assert s["parity"] and s["rounds_committed"] < s["rounds_target"]
    else:
        assert not s["parity"] and s["parity_problems"]


def test_links_follow_regions_and_pairs(tmp_path):
    from dtrain.sim.cluster import Simulation

    from conftest import compose

    cfg = compose(
        [
            f"run_dir={tmp_path}",
            "sim.regions=[eu,us,asia]",
            "+wan.pairs.asia-eu=[120,10,50]",
            "wan.latency_ms=80",
            "wan.jitter_ms=5",
            "wan.bandwidth_mbit=100",
            "wan.local.latency_ms=1",
        ],
        config_name="sim",
    )
    sim = Simulation(cfg)
    assert [sim.region_of(i) for i in range(4)] == ["eu", "us", "asia", "eu"]
    assert sim.link_of("eu", "us") == LinkSpec(80, 5, 100)
    assert sim.link_of("eu", "asia") == LinkSpec(120, 10, 50) == sim.link_of("asia", "eu")
    assert sim.link_of("us", "us") == LinkSpec(1, 0, 1000)  # conf/sim.yaml: wan.local
    assert sim.coord_region() == "eu"


@pytest.mark.timeout(60)
def test_wan_uplink_is_shared_by_all_links_of_a_node():
    w = WanEmulator(lambda a, b: LinkSpec(), seed=0)
    sinks = [EchoSink(), EchoSink()]
    try:
        url = w.add_node("a", "eu", uplink_mbit=40)
        for name, sink in zip(("b", "c"), sinks):
            w.add_node(name, name)
            w.register(name, sink.address)
        conns = [connect_via(url, sink.address) for sink in sinks]
        payload = b"z" * (1 << 20)
        t0 = time.monotonic()
        threads = [threading.Thread(target=c.sendall, args=(payload + b"?",)) for c in conns]
        for t in threads:
            t.start()
        for t, c in zip(threads, conns):
            t.join()
            assert c.recv(1) == b"!"
        took = time.monotonic() - t0
        ideal = 2 * len(payload) * 8 / 40e6  # both links' bytes through one 40 Mbit/s uplink
        assert ideal * 0.95 <= took < ideal * 1.6 + 0.5, (took, ideal)
        for c in conns:
            c.close()
    finally:
        w.close()
        for s in sinks:
            s.close()
