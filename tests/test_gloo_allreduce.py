"""The gloo outer collective (dtrain.comm.gloo_allreduce) across member processes.

Members are subprocesses of this file (``python test_gloo_allreduce.py --worker``) that
answer JSON-line commands on stdin/stdout; each holds its GlooCollectives across
commands, so group reuse is visible. The TCPStore master lives in the test process
on 127.0.0.1 (port 0). Inputs are regenerated here from the same seeds to check
the mean: quantised codecs exactly (sum of decoded payloads in ring order / k),
fp32 within float32 rounding; every member's result bytes must hash the same.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch

from dtrain.comm.collective import CollectiveError, Group
from dtrain.comm.gloo_allreduce import GlooCollective
from dtrain.wire.codec import Codec, CodecError

try:
    from dtrain.outer.codecs import get_codec
except ImportError:  # written concurrently; the test codecs below still run
    get_codec = None

MARGIN_S = 1.0  # timeout_margin_s of the workers' collectives


# --------------------------------------------------------------------------- minimal test codecs


class _TestFP32(Codec):
    """Raw little-endian float32 (name fp32: takes gloo's native allreduce)."""

    name = "fp32"

    @property
    def lossless(self) -> bool:
        return True

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def encode(self, x: torch.Tensor) -> bytes:
        if not bool(torch.isfinite(x).all()):
            raise CodecError("fp32: non-finite input")
        return x.numpy().astype("<f4").tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        if len(payload) != 4 * numel:
            raise CodecError(f"fp32: expected {4 * numel} bytes, got {len(payload)}")
        out = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(out).all()):
            raise CodecError("fp32: non-finite value")
        return out


class _TestInt8(Codec):
    """One float32 scale s = absmax / 127, then n int8 codes round(x / s); -128 is invalid."""

    name = "test-int8"

    def encoded_size(self, numel: int) -> int:
        return 4 + numel

    def encode(self, x: torch.Tensor) -> bytes:
        if not bool(torch.isfinite(x).all()):
            raise CodecError("test-int8: non-finite input")
        s = (x.abs().max() / 127).reshape(1) if x.numel() else torch.zeros(1)
        q = torch.round(x / s).clamp(-127, 127) if float(s) > 0 else torch.zeros_like(x)
        return s.numpy().astype("<f4").tobytes() + q.to(torch.int8).numpy().tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        if len(payload) != 4 + numel:
            raise CodecError(f"test-int8: expected {4 + numel} bytes, got {len(payload)}")
        s = float(np.frombuffer(payload[:4], dtype="<f4")[0])
        if not math.isfinite(s) or s < 0:
            raise CodecError(f"test-int8: bad scale {s}")
        q = np.frombuffer(payload[4:], dtype=np.int8)
        if q.size and int(q.min()) < -127:
            raise CodecError("test-int8: code -128")
        return torch.from_numpy(q.astype(np.float32)) * torch.tensor(s, dtype=torch.float32)


class _Corrupt(Codec):
    """Wraps a codec; every payload it encodes is all 0xFF (invalid for the quantised codecs used here)."""

    def __init__(self, inner: Codec):
        self.inner, self.name = inner, inner.name

    def encoded_size(self, numel: int) -> int:
        return self.inner.encoded_size(numel)

    def encode(self, x: torch.Tensor) -> bytes:
        return b"\xff" * self.inner.encoded_size(x.numel())

    def decode(self, payload, numel: int) -> torch.Tensor:
        return self.inner.decode(payload, numel)


def make_codec(label: str) -> Codec:
    if label == "test-fp32":
        return _TestFP32()
    if label == "test-int8":
        return _TestInt8()
    return get_codec(label)


CODECS = ["test-fp32", "test-int8"] + (["fp32", "bf16", "int8", "int4"] if get_codec is not None else [])


def make_input(seed: int, n: int) -> torch.Tensor:
    """Values over several orders of magnitude (so float32 sums depend on their order)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))


def seed_of(peer: str, qid: int, rnd: int, op: str) -> int:
    return zlib.crc32(f"{peer}/{qid}/{rnd}/{op}".encode())


# --------------------------------------------------------------------------- the worker (member) process


def _worker_main() -> int:
    collectives = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        label = cmd["codec"] + (":corrupt" if cmd.get("corrupt") else "")
        coll = collectives.get(label)
        if coll is None:
            codec = make_codec(cmd["codec"])
            coll = collectives[label] = GlooCollective(
                _Corrupt(codec) if cmd.get("corrupt") else codec, timeout_margin_s=MARGIN_S
            )
        members = tuple((m, f"127.0.0.1:{20000 + i}") for i, m in enumerate(cmd["members"]))
        weights = tuple(cmd.get("weights") or ())
        group = Group(cmd["qid"], cmd["round"], members, cmd["me"], cmd["op"], cmd["store"], weights)
        x = make_input(cmd["seed"], cmd["n"])
        if "scale" in cmd:
            x = x * cmd["scale"]
        if cmd.get("nan"):
            x[x.numel() // 2] = float("nan")
        reply = {}
        t0 = time.monotonic()
        try:
            res = coll.allreduce_mean(x, group, cmd["deadline"])
            data = res.tensor.numpy().tobytes()
            reply = {
                "ok": True,
                "sha": hashlib.sha256(data).hexdigest(),
                "sent": res.bytes_sent,
                "recv": res.bytes_recv,
            }
            if cmd.get("out"):
                with open(cmd["out"], "wb") as f:
                    f.write(data)
        except CollectiveError as e:
            reply = {"ok": False, "error": str(e), "culprit": e.culprit}
        reply.update(elapsed=time.monotonic() - t0, built=coll.groups_built, live=coll.live_groups)
        print(json.dumps(reply), flush=True)
    return 0


# --------------------------------------------------------------------------- driving workers from the test


class Worker:
    _ids = itertools.count()

    def __init__(self, logdir):
        self.id = f"m{next(Worker._ids)}"
        self.log = open(os.path.join(logdir, f"{self.id}.log"), "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put("")

    def send(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def reply(self, timeout: float = 30.0) -> dict:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise AssertionError(f"worker {self.id} exited (rc {self.p.poll()})")
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.p.poll() is None

    def sigkill(self):
        os.kill(self.p.pid, signal.SIGKILL)  # this worker's own pid, started above
        self.p.wait(10)

    def stop(self):
        try:
            if self.alive:
                try:
                    self.send(cmd="exit")
                except OSError:
                    pass
                try:
                    self.p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if self.alive:
                self.p.kill()
                self.p.wait(10)
            self.log.close()


class Pool:
    """Long-lived member processes (importing torch costs seconds); dead ones are replaced."""

    def __init__(self, logdir):
        self.logdir, self.workers = logdir, []

    def get(self, n: int):
        live = [w for w in self.workers if w.alive]
        fresh = [Worker(self.logdir) for _ in range(n - len(live))]
        self.workers += fresh
        for w in fresh:
            assert "ready" in w.reply(timeout=90), w.id
        return (live + fresh)[:n]

    def close(self):
        for w in self.workers:  # all told first, so that they wind down together
            try:
                if w.alive:
                    w.send(cmd="exit")
            except OSError:
                pass
        for w in self.workers:
            w.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(str(tmp_path_factory.mktemp("gloo-workers")))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def store():
    import torch.distributed as dist

    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    yield f"127.0.0.1:{master.port}"


_qids = itertools.count(1)


def run(
    members,
    callers,
    store,
    qid,
    rnd=1,
    codec="test-fp32",
    n=1000,
    deadline=10.0,
    op="all",
    out_dir=None,
    per_member=None,
    weights=(),
):
    """Have ``callers`` (a subset of ``members``) run one collective; their replies in order."""
    ids = [w.id for w in members]
    for w in callers:
        cmd = dict(
            cmd="reduce",
            codec=codec,
            qid=qid,
            round=rnd,
            members=ids,
            me=w.id,
            op=op,
            store=store,
            deadline=deadline,
            n=n,
            seed=seed_of(w.id, qid, rnd, op),
            out=str(out_dir / f"{w.id}.bin") if out_dir is not None else None,
            weights=list(weights),
        )
        cmd.update((per_member or {}).get(w.id, {}))
        w.send(**cmd)
    return [w.reply(timeout=deadline + 30) for w in callers]


def expected_mean(ids, qid, rnd, op, codec_label, n):
    xs = [make_input(seed_of(i, qid, rnd, op), n) for i in ids]
    codec = make_codec(codec_label)
    if codec.name == "fp32":
        return torch.stack([x.double() for x in xs]).mean(0), xs
    total = None
    for x in xs:  # the documented order: decode every payload, sum in ring order in float32
        d = codec.decode(codec.encode(x), n)
        total = d if total is None else total.add_(d)
    return total.div_(len(xs)), xs


def check_ok(replies):
    for r in replies:
        assert r["ok"], r
    assert len({r["sha"] for r in replies}) == 1, "results differ between members"


# --------------------------------------------------------------------------- (a) the mean, bit-identical


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_mean_is_bit_identical_on_every_member(pool, store, tmp_path, k):
    members = pool.get(k)
    ids = [w.id for w in members]
    qid = next(_qids)
    for codec in CODECS:
        for n in (1, 7, 1000, 100_003):
            op = f"{codec}-{n}"
            replies = run(members, members, store, qid, codec=codec, n=n, op=op, out_dir=tmp_path)
            check_ok(replies)
            got = torch.from_numpy(np.fromfile(tmp_path / f"{ids[0]}.bin", dtype=np.float32))
            assert got.numel() == n
            want, xs = expected_mean(ids, qid, 1, op, codec, n)
            if want.dtype == torch.float64:  # fp32: within float32 rounding of a k-term sum
                bound = (k + 1) * 2.0**-23 * torch.stack([x.abs().double() for x in xs]).sum(0) / k
                assert bool(((got.double() - want).abs() <= bound + 1e-30).all()), (codec, n)
                moved = 2 * (k - 1) * 4 * n // k
            else:  # quantised: exactly the sum of decoded payloads in ring order
                assert torch.equal(got, want), (codec, n)
                moved = (k - 1) * (1 + make_codec(codec).encoded_size(n))
            assert all(r["sent"] == r["recv"] == moved for r in replies)


# --------------------------------------------------------------------------- (a') weighted means

# ring order; a 0 (first for k = 3: gloo starts its sum from that part); weights of 13-14 bits, so that
# w * part is not exact in float32 even for the few significant bits of decoded fp16 / int8 / int4 values
WEIGHTED = {3: (0, 8191, 12345), 4: (4099, 0, 12289, 1)}
REAL_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")  # dtrain.config.CODEC_NAMES, checked below


def weighted_expected(ids, qid, rnd, op, codec_label, n, weights, scales):
    """(float64 weighted mean, inputs) for fp32; for the others the documented float32 arithmetic written
    out in numpy: decode every payload, ``total + fl(w * part)`` in ring order from zeros, ``/ sum(w)``."""
    xs = [make_input(seed_of(i, qid, rnd, op), n) * scales[i] for i in ids]
    codec = make_codec(codec_label)
    if codec.name == "fp32":
        w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
        return (w * torch.stack([x.double() for x in xs])).sum(0) / sum(weights), xs
    total = np.zeros(n, dtype=np.float32)
    for x, w in zip(xs, weights):
        if w:
            total = total + codec.decode(codec.encode(x), n).numpy() * np.float32(w)
    return torch.from_numpy(total / np.float32(sum(weights))), xs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", sorted(WEIGHTED))
def test_weighted_mean_is_bit_identical_and_follows_the_weights(pool, store, tmp_path, k):
    """Unequal weights (one of them 0, its member holding huge values): every member has the same bits,
    the weighted mean of the decoded payloads in ring order (fp32, gloo's own allreduce: within float32
    rounding of the float64 weighted mean); all weights 1: exactly the bits of the unweighted group."""
    if get_codec is not None:
        from dtrain.config import CODEC_NAMES

        assert tuple(CODEC_NAMES) == REAL_CODECS
    members = pool.get(k)
    ids = [w.id for w in members]
    weights = WEIGHTED[k]
    qid = next(_qids)
    for codec in REAL_CODECS if get_codec is not None else ("test-fp32", "test-int8"):
        base = 1e-2 if codec == "fp16" else 1.0  # fp16 holds |x| <= 65504
        huge = 0.5 if codec == "fp16" else 1e30  # the 0-weight member: far larger than everyone else
        scales = {i: (huge if w == 0 else base) for i, w in zip(ids, weights)}
        per_member = {i: {"scale": s} for i, s in scales.items()}
        for n in (7, 100_003):
            op = f"w-{codec}-{n}"
            kw = dict(op=op, per_member=per_member)
            check_ok(run(members, members, store, qid, 1, codec, n, out_dir=tmp_path, weights=weights, **kw))
            got = torch.from_numpy(np.fromfile(tmp_path / f"{ids[0]}.bin", dtype=np.float32))
            want, xs = weighted_expected(ids, qid, 1, op, codec, n, weights, scales)
            if want.dtype == torch.float64:  # product, k-1 sums, division: within k+1 float32 roundings
                w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
                scale = (w * torch.stack([x.abs().double() for x in xs])).sum(0) / sum(weights)
                bound = (k + 1) * 2.0**-23 * scale
                assert bool(((got.double() - want).abs() <= bound + 1e-30).all()), (codec, n)
            else:
                assert torch.equal(got, want), (codec, n)
            # all weights 1 (what integer_weights gives equal samples) and no weights: the same bits
            ones = run(members, members, store, qid, 2, codec, n, weights=(1,) * k, **kw)
            plain = run(members, members, store, qid, 2, codec, n, **kw)
            check_ok(ones + plain)
            assert ones[0]["sha"] == plain[0]["sha"], (codec, n)
    # finite inputs whose weighted sum overflows: refused by everyone, nobody named, nothing returned
    for codec in ("fp32", "int8") if get_codec is not None else ():
        big = {i: {"scale": 1e35} for i in ids}
        for r in run(
            members, members, store, qid, 3, codec, 1000, op=f"w-{codec}-1000", per_member=big, weights=weights
        ):
            assert not r["ok"] and r["culprit"] is None and "overflowed" in r["error"], (codec, r)


# --------------------------------------------------------------------------- (b) reuse, then rebuild


@pytest.mark.timeout(60)
def test_group_reused_for_a_quorum_and_rebuilt_when_it_changes(pool, store, tmp_path):
    members = pool.get(3)
    qid = next(_qids)
    before = [r["built"] for r in run(members, members, store, qid, rnd=0, op="warm")]
    for rnd in (1, 2, 3):
        replies = run(members, members, store, qid, rnd=rnd, codec="test-fp32")
        check_ok(replies)
    built = [r["built"] for r in replies]
    assert [b - a for a, b in zip(before, built)] == [1, 1, 1]  # one group for op "all" in three rounds
    # the quorum changes: 3 -> 2 members under a new quorum id: a new group, the old ones dropped
    qid2 = next(_qids)
    replies = run(members[:2], members[:2], store, qid2, rnd=4, out_dir=tmp_path)
    check_ok(replies)
    assert [r["built"] for r in replies] == [b + 1 for b in built[:2]]
    assert [r["live"] for r in replies] == [1, 1]
    want, _ = expected_mean([w.id for w in members[:2]], qid2, 4, "all", "test-fp32", 1000)
    got = torch.from_numpy(np.fromfile(tmp_path / f"{members[0].id}.bin", dtype=np.float32))
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    # and the next round of that quorum reuses it
    replies = run(members[:2], members[:2], store, qid2, rnd=5)
    check_ok(replies)
    assert [r["built"] for r in replies] == [b + 1 for b in built[:2]]


# --------------------------------------------------------------------------- (c) a member that never comes


@pytest.mark.timeout(60)
def test_member_that_never_joins_or_goes_silent(pool, store):
    members = pool.get(3)
    deadline = 2.0
    # never joins: the other two wait in the rendezvous until the deadline
    t0 = time.monotonic()
    replies = run(members, members[:2], store, next(_qids), codec="test-int8", deadline=deadline)
    wall = time.monotonic() - t0
    for r in replies:
        assert not r["ok"] and r["culprit"] is None, r
        assert 0.8 * deadline <= r["elapsed"] <= deadline + MARGIN_S, r
    assert wall <= deadline + MARGIN_S + 1.0
    # silent on a group built earlier (a reused group): each gloo op has the time left as its timeout
    qid = next(_qids)
    check_ok(run(members, members, store, qid, rnd=1, deadline=30.0))
    replies = run(members, members[:2], store, qid, rnd=2, deadline=deadline)
    for r in replies:
        assert not r["ok"] and r["culprit"] is None, r
        assert 0.8 * deadline <= r["elapsed"] <= deadline + MARGIN_S, r
        assert "abandoned" not in r["error"], r  # gloo's own timeout fired, not the backstop
    # the next quorum (everyone back) works
    check_ok(run(members, members, store, next(_qids), rnd=3))


# --------------------------------------------------------------------------- (d) a member SIGKILLed


@pytest.mark.timeout(90)
def test_member_sigkilled_before_and_during_the_collective(pool, store, tmp_path):
    a, b, c, d = pool.get(4)
    deadline = 5.0
    q1 = next(_qids)
    check_ok(run([a, b, c, d], [a, b, c, d], store, q1, rnd=1))
    # before: d dies between rounds; the cached group of q1 fails for the others
    d.sigkill()
    t0 = time.monotonic()
    replies = run([a, b, c, d], [a, b, c], store, q1, rnd=2, deadline=deadline)
    for r in replies:  # d's ring neighbours see its sockets closed; dropping their group tells b at once
        assert not r["ok"] and r["elapsed"] < deadline / 2, r
    assert time.monotonic() - t0 < deadline
    # the survivors' next quorum
    q2 = next(_qids)
    replies = run([a, b, c], [a, b, c], store, q2, rnd=2, codec="test-int8", out_dir=tmp_path)
    check_ok(replies)
    want, _ = expected_mean([a.id, b.id, c.id], q2, 2, "all", "test-int8", 1000)
    assert torch.equal(torch.from_numpy(np.fromfile(tmp_path / f"{a.id}.bin", dtype=np.float32)), want)
    # mid-way: a and b are inside the allreduce waiting for c when c is killed
    replies = run([a, b, c], [a, b, c], store, q2, rnd=3)  # the group is cached
    check_ok(replies)
    run_t0 = time.monotonic()
    for w in (a, b):
        w.send(
            cmd="reduce",
            codec="test-fp32",
            qid=q2,
            round=4,
            members=[a.id, b.id, c.id],
            me=w.id,
            op="all",
            store=store,
            deadline=deadline,
            n=1000,
            seed=1,
        )
    time.sleep(0.5)
    c.sigkill()
    replies = [w.reply(timeout=deadline + 30) for w in (a, b)]
    for r in replies:
        assert not r["ok"] and r["elapsed"] < deadline / 2, r  # the closed sockets, not the timeout
    assert time.monotonic() - run_t0 < deadline / 2
    # and the last two carry on under a new quorum id
    check_ok(run([a, b], [a, b], store, next(_qids), rnd=4))


# --------------------------------------------------------------------------- (e) culprits


@pytest.mark.timeout(60)
def test_invalid_payloads_name_the_culprit(pool, store):
    members = pool.get(3)
    ids = [w.id for w in members]
    quantised = "int8" if get_codec is not None else "test-int8"
    cases = [
        (quantised, {ids[1]: {"corrupt": True}}, ids[1]),  # garbage bytes: decode fails everywhere
        (quantised, {ids[0]: {"nan": True}}, ids[0]),  # cannot encode: the status byte says so
        ("test-fp32", {ids[2]: {"nan": True}}, ids[2]),  # fp32 allreduce: a non-finite mean, then flags
        ("test-int8", {ids[2]: {"n": 1001}}, ids[2]),  # another size: caught at build, no gloo abort
        ("test-fp32", {ids[0]: {"n": 999}}, ids[0]),
    ]
    for codec, per_member, culprit in cases:
        replies = run(members, members, store, next(_qids), codec=codec, per_member=per_member, deadline=10.0)
        for r in replies:
            assert not r["ok"] and r["culprit"] == culprit, (codec, per_member, r)
            assert r["elapsed"] < 5.0, r
    assert all(w.alive for w in members)
    check_ok(run(members, members, store, next(_qids)))


# --------------------------------------------------------------------------- in-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(30)
def test_unreachable_store_and_local_cases():
    codec = _TestInt8()
    coll = GlooCollective(codec, timeout_margin_s=0.5)
    members = (("a", "127.0.0.1:1"), ("b", "127.0.0.1:2"))
    group = Group(1, 1, members, "a", "all", f"127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    with pytest.raises(CollectiveError) as e:
        coll.allreduce_mean(torch.ones(10), group, 1.0)
    assert time.monotonic() - t0 <= 1.0 + 0.5 + 0.3 and e.value.culprit is None
    with pytest.raises(CollectiveError, match="gloo_store"):
        coll.allreduce_mean(torch.ones(10), Group(2, 1, members, "a", "all", ""), 1.0)
    # alone: no traffic; a quantised codec still applies decode(encode(x))
    x = make_input(3, 300)
    alone = Group(3, 1, (("a", "127.0.0.1:1"),), "a")
    res = coll.allreduce_mean(x, alone, 1.0)
    assert torch.equal(res.tensor, codec.decode(codec.encode(x), 300)) and res.bytes_sent == 0
    assert torch.equal(GlooCollective(_TestFP32()).allreduce_mean(x, alone, 1.0).tensor, x)
    with pytest.raises(ValueError):
        coll.allreduce_mean(x.double(), alone, 1.0)
    with pytest.raises(ValueError):
        coll.allreduce_mean(x, Group(3, 1, members, "c"), 1.0)
    coll.close()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
