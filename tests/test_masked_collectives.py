"""Slices in the outer collectives (``group.masks``): the masked weighted mean on both backends and every codec,
and the pure helpers of ``dtrain.outer.masking``.

Every member of a group passes its compact payload (the values of the coordinates its mask covers) and gets the
full vector and the covered coordinates back, the same bits everywhere: for quantised codecs exactly the
documented float32 arithmetic written out in numpy here, for fp32 within float32 rounding of a float64 mean.
Masks nested and not, one member full (None), one empty, weights unequal and 0, coordinates nobody covers; a
payload of the wrong length is named; masks all None are the unmasked collective, bit for bit; and the grpc
backend's bytes follow the slice. grpc members are threads with their own servers (as in
``test_grpc_allreduce``); gloo members are threads too, over one TCPStore.
"""

from __future__ import annotations

import datetime
import itertools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_grpc_allreduce import SCHEMA, NaNSender, assert_all_fail, ok_results, run_all

from dtrain.comm.collective import CollectiveError, CollectiveResult, Group
from dtrain.comm.gloo_allreduce import GlooCollective
from dtrain.comm.grpc_allreduce import GrpcCollective
from dtrain.comm.peer_service import PeerServicer, serve_peer
from dtrain.comm.shard_inbox import ShardInbox
from dtrain.config import CODEC_NAMES
from dtrain.outer import masking
from dtrain.outer.codecs import get_codec
from dtrain.outer.masking import (
    compact,
    covered_mask,
    masked_weighted_mean,
    nth_true,
    owner_sizes,
    scatter,
    shard_layout,
    weight_sums,
)
from dtrain.outer.weighting import weighted_mean
from dtrain.wire.codec import Codec

from conftest import stop_servers

HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0**-24  # float32 unit roundoff
BIG = float(np.float32(1e30))  # weights <= 5000, k <= 5: no overflow
TINY = float(np.float32(1e-45))
BLOCK = 32  # int8 / int4 blocks: small, so that shards cut many of them
Mask = Optional[torch.Tensor]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def codec_of(name: str) -> Codec:
    return get_codec(name, block_size=BLOCK)


# ---------------------------------------------------------------- scenarios

# ring order; a 0 weight (its member holds huge values); 13-14-bit weights: w * part is not exact in float32
WEIGHTS = {3: (2, 0, 7), 4: (4099, 0, 12289, 1)}
KINDS = ("nested", "overlapping", "ranges")


def scenario(kind: str, k: int, n: int, seed: int) -> Tuple[Mask, ...]:
    """Masks for k members over n coordinates, in ring order.

    nested: member 0 full (None), the others prefixes of one random order (60%, 25%; the last empty);
    overlapping: independent random masks (70%, 50%, 30%, 10%): some coordinates nobody covers;
    ranges: contiguous ranges, not nested, with a gap nobody covers and one member empty."""
    g = np.random.default_rng(seed)
    if kind == "nested":
        u = g.random(n)
        fracs = [0.6, 0.25, 0.0][: k - 1] if k > 3 else [0.25, 0.0]
        return (None, *(torch.from_numpy(u < f) for f in fracs))
    if kind == "overlapping":
        return tuple(torch.from_numpy(g.random(n) < f) for f in (0.7, 0.5, 0.3, 0.1)[:k])
    spans = [(0, n // 2), (n // 4, 3 * n // 4), (n - n // 6, n), (0, 0)][:k]
    out = []
    for a, b in spans:
        m = torch.zeros(n, dtype=torch.bool)
        m[a:b] = True
        out.append(m)
    return tuple(out)


def inputs(n: int, weights: Sequence[int], seed: int, huge: float) -> List[torch.Tensor]:
    """Full vectors made by numpy (0-weight members: huge values that must count for nothing)."""
    g = np.random.default_rng(seed)
    return [
        torch.from_numpy((g.standard_normal(n) * (huge if w == 0 else 1 + j)).astype(np.float32))
        for j, w in enumerate(weights)
    ]


def np_masked_mean(parts, masks, weights, n) -> Tuple[np.ndarray, np.ndarray]:
    """The documented arithmetic, written out in numpy (skipping what a member does not cover): per coordinate,
    ``total + fl(w * x)`` over the covering members in ring order from zeros, ``/ float32(W)``; 0 where W = 0."""
    total = np.zeros(n, dtype=np.float32)
    wsum = np.zeros(n, dtype=np.int64)
    for p, m, w in zip(parts, masks, weights):
        if not w:
            continue
        where = np.ones(n, dtype=bool) if m is None else m.numpy()
        total[where] = total[where] + np.asarray(p, dtype=np.float32) * np.float32(w)
        wsum[where] += w
    cov = wsum > 0
    out = np.zeros(n, dtype=np.float32)
    out[cov] = total[cov] / wsum[cov].astype(np.float32)
    return out, cov


def float64_check(got: torch.Tensor, fulls, masks, weights) -> None:
    """fp32: within float32 rounding of the float64 masked weighted mean (k products and sums, one division)."""
    n, k = got.numel(), len(fulls)
    num, den, scale = np.zeros(n), np.zeros(n), np.zeros(n)
    for x, m, w in zip(fulls, masks, weights):
        where = np.ones(n, dtype=bool) if m is None else m.numpy()
        num[where] += w * x.numpy()[where].astype(np.float64)
        scale[where] += w * np.abs(x.numpy()[where].astype(np.float64))
        den[where] += w
    cov = den > 0
    want = np.zeros(n)
    want[cov] = num[cov] / den[cov]
    bound = np.zeros(n)
    bound[cov] = (k + 1) * U / (1 - (k + 1) * U) * scale[cov] / den[cov] + (k + 2) * 2.0**-149
    assert np.all(np.abs(got.numpy().astype(np.float64) - want) <= bound)


def grpc_reference(xs, masks, weights, codec: Codec, n: int):
    """The grpc backend's result, written out: owner i decodes every member's blocks, keeps its shard's
    coordinates, takes the masked mean (numpy) and everyone decodes E(its covered means)."""
    lay = shard_layout(masks, weights, n, getattr(codec, "block_size", 1))
    out = np.zeros(n, dtype=np.float32)
    covered = np.zeros(n, dtype=bool)
    for i in range(len(xs)):
        s, e = lay.edges[i], lay.edges[i + 1]
        parts = []
        for j, x in enumerate(xs):
            lo, hi, a, b = lay.part(j, i)
            dec = codec.decode(codec.encode(x[a:b].contiguous()), b - a).numpy() if b > a else np.zeros(0)
            parts.append(dec[lo - a : hi - a])
        local = [None if m is None else m[s:e] for m in masks]
        mean, cov = np_masked_mean(parts, local, weights, e - s)
        covered[s:e] = cov
        y = codec.decode(codec.encode(torch.from_numpy(mean[cov].copy())), int(cov.sum()))
        out[s:e][cov] = y.numpy()
    return torch.from_numpy(out), covered


def gloo_reference(xs, masks, weights, codec: Codec, n: int):
    """The gloo backend's result for a quantised codec: every member decodes every payload whole, then the
    masked mean (numpy)."""
    parts = [codec.decode(codec.encode(x), x.numel()).numpy() for x in xs]
    mean, cov = np_masked_mean(parts, masks, weights, n)
    return torch.from_numpy(mean), cov


def check_same(results: List[CollectiveResult], n: int) -> Tuple[torch.Tensor, np.ndarray]:
    """Every member: the same bits of ``tensor`` and ``covered``; returns them (covered as a full bool array)."""
    first = results[0]
    assert first.tensor.dtype == torch.float32 and first.tensor.shape == (n,)
    for r in results[1:]:
        assert bits(r.tensor) == bits(first.tensor)
        assert (r.covered is None) == (first.covered is None)
        if first.covered is not None:
            assert r.covered is not None and torch.equal(r.covered, first.covered)
    if first.covered is None:
        return first.tensor, np.ones(n, dtype=bool)
    assert first.covered.dtype == torch.bool and first.covered.shape == (n,) and not bool(first.covered.all())
    return first.tensor, first.covered.numpy()


# ---------------------------------------------------------------- harnesses


@pytest.fixture
def grpc_members():
    """``start(k, codec, codecs={peer: codec})`` -> (members, collectives): k in-process members with their own
    servers (as ``test_grpc_allreduce.cluster``); all closed and stopped at teardown."""
    servers, collectives = [], []

    def start(k: int, codec=None, codecs=None, chunk_bytes: int = 1 << 20):
        members = []
        for i in range(k):
            pid = f"p{i}"
            inbox = ShardInbox()
            server, port = serve_peer(PeerServicer(SCHEMA, pid, inbox=inbox), max_workers=16)
            servers.append(server)
            c = (codecs or {}).get(pid) or codec
            collectives.append(GrpcCollective(c(), pid, chunk_bytes=chunk_bytes, inbox=inbox))
            members.append((pid, f"127.0.0.1:{port}"))
        return tuple(members), collectives[-k:]

    try:
        yield start
    finally:
        for c in collectives:
            c.close()
        stop_servers(servers)


def grpc_run(members, cols, xs, masks, weights, rnd: int, deadline: float = 20.0):
    calls = [
        lambda i=i: cols[i].allreduce_mean(
            xs[i], Group(1, rnd, members, members[i][0], "m", "", tuple(weights), tuple(masks)), deadline
        )
        for i in range(len(cols))
    ]
    return run_all(calls, timeout=deadline + 10)


@pytest.fixture(scope="module")
def gloo_store():
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    yield f"127.0.0.1:{master.port}"


_qids = itertools.count(1)


def gloo_run(store, codecs: Sequence[Codec], xs, masks, weights, deadline: float = 10.0, qid=None):
    """One collective over gloo: k members as threads of this process, one GlooCollective each."""
    k = len(xs)
    qid = next(_qids) if qid is None else qid
    members = tuple((f"g{i}", f"127.0.0.1:{20000 + i}") for i in range(k))
    cols = [GlooCollective(c, timeout_margin_s=1.0) for c in codecs]
    try:
        calls = [
            lambda i=i: cols[i].allreduce_mean(
                xs[i], Group(qid, 1, members, members[i][0], "m", store, tuple(weights), tuple(masks)), deadline
            )
            for i in range(k)
        ]
        return run_all(calls, timeout=deadline + 10)
    finally:
        for c in cols:
            c.close()


# ---------------------------------------------------------------- (a) the masked mean, both backends, every codec


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec_name", CODEC_NAMES)
@pytest.mark.parametrize("k", sorted(WEIGHTS))
def test_grpc_masked_mean(grpc_members, codec_name, k):
    members, cols = grpc_members(k, codec=lambda: codec_of(codec_name), chunk_bytes=700)
    codec, weights = codec_of(codec_name), WEIGHTS[k]
    huge = 0.5e4 if codec_name == "fp16" else 1e30
    for rnd, (kind, n) in enumerate(itertools.product(KINDS, (1, 37, 3001))):
        masks = scenario(kind, k, n, seed=rnd)
        fulls = inputs(n, weights, seed=100 * k + rnd, huge=huge)
        xs = [compact(x, m) for x, m in zip(fulls, masks)]
        got, cov = check_same(ok_results(grpc_run(members, cols, xs, masks, weights, rnd)), n)
        want, want_cov = grpc_reference(xs, masks, weights, codec, n)
        assert bits(got) == bits(want), (kind, n)
        assert np.array_equal(cov, want_cov)
        assert np.all(got.numpy()[~cov] == 0) and np.all(np.signbit(got.numpy()[~cov]) == 0)
        if codec.lossless:
            assert bits(got) == bits(masked_weighted_mean(xs, masks, weights, n)[0])
            float64_check(got, fulls, masks, weights)
    for inbox in (c.inbox for c in cols):
        assert inbox.open_groups() == [] and inbox.early_bytes() == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", sorted(WEIGHTS))
def test_gloo_masked_mean(gloo_store, k):
    weights = WEIGHTS[k]
    for codec_name in CODEC_NAMES:
        codec = codec_of(codec_name)
        huge = 0.5e4 if codec_name == "fp16" else 1e30
        for rnd, (kind, n) in enumerate(itertools.product(KINDS, (1, 3001))):
            masks = scenario(kind, k, n, seed=rnd)
            fulls = inputs(n, weights, seed=200 * k + rnd, huge=huge)
            xs = [compact(x, m) for x, m in zip(fulls, masks)]
            outs = gloo_run(gloo_store, [codec_of(codec_name) for _ in range(k)], xs, masks, weights)
            results = ok_results(outs)
            got, cov = check_same(results, n)
            assert np.array_equal(cov, np_masked_mean([x.numpy() for x in xs], masks, weights, n)[1])
            assert np.all(got.numpy()[~cov] == 0)
            if codec.lossless:  # gloo's own allreduce: its order, within float32 rounding
                float64_check(got, fulls, masks, weights)
                moved = 2 * (k - 1) * 4 * n // k
            else:
                want, _ = gloo_reference(xs, masks, weights, codec, n)
                assert bits(got) == bits(want), (codec_name, kind, n)
                moved = (k - 1) * (1 + max(codec.encoded_size(x.numel()) for x in xs))  # padded to the longest
            assert all(r.bytes_sent == r.bytes_recv == moved for r in results)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_grpc_phase_one_keeps_payloads_on_the_codec_grid(grpc_members, codec_name):
    """A compact payload put on the codec's grid (error feedback) crosses phase 1 unchanged: every member sends
    whole blocks of its payload, so the owners sum exactly its values (only the mean is quantised again)."""
    k, n = 4, 5000
    codec, weights = codec_of(codec_name), WEIGHTS[4]
    members, cols = grpc_members(k, codec=lambda: codec_of(codec_name), chunk_bytes=500)
    masks = scenario("overlapping", k, n, seed=7)
    fulls = inputs(n, weights, seed=8, huge=1e30)
    xs = [codec.decode(codec.encode(compact(x, m)), int(m.sum())) for x, m in zip(fulls, masks)]  # on the grid
    got, _ = check_same(ok_results(grpc_run(members, cols, xs, masks, weights, 0)), n)
    lay = shard_layout(masks, weights, n, BLOCK)
    want = np.zeros(n, dtype=np.float32)
    for i in range(k):  # the reference with phase 1 lossless
        s, e = lay.edges[i], lay.edges[i + 1]
        parts = [x[lay.offsets[j][i] : lay.offsets[j][i + 1]].numpy() for j, x in enumerate(xs)]
        mean, cov = np_masked_mean(parts, [None if m is None else m[s:e] for m in masks], weights, e - s)
        want[s:e][cov] = codec.decode(codec.encode(torch.from_numpy(mean[cov].copy())), int(cov.sum())).numpy()
    assert bits(got) == want.tobytes()
    # and the boundaries really cut blocks of the payloads (so whole blocks were needed)
    assert any(lay.offsets[j][i] % BLOCK for j in range(k) for i in range(1, k))


# ---------------------------------------------------------------- (b) no masks: the unmasked collective


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec_name", CODEC_NAMES)
def test_masks_all_none_give_the_unmasked_bits(grpc_members, gloo_store, codec_name):
    k, n = 3, 2049
    weights = WEIGHTS[3]
    members, cols = grpc_members(k, codec=lambda: codec_of(codec_name))
    xs = inputs(n, weights, seed=11, huge=0.5e4 if codec_name == "fp16" else 1e30)
    plain = ok_results(grpc_run(members, cols, xs, (), weights, 1))
    nones = ok_results(grpc_run(members, cols, xs, (None,) * k, weights, 2))  # (round 1 and 2: headers alike)
    assert all(bits(r.tensor) == bits(plain[0].tensor) and r.covered is None for r in plain + nones)
    assert [r.bytes_sent for r in plain] == [r.bytes_sent for r in nones]
    g_plain = ok_results(gloo_run(gloo_store, [codec_of(codec_name) for _ in range(k)], xs, (), weights))
    g_nones = ok_results(gloo_run(gloo_store, [codec_of(codec_name) for _ in range(k)], xs, (None,) * k, weights))
    assert all(bits(r.tensor) == bits(g_plain[0].tensor) and r.covered is None for r in g_plain + g_nones)
    if codec_name == "fp32":  # every mask all True: the formula reduces to the unmasked mean, bit for bit
        full = tuple(torch.ones(n, dtype=torch.bool) for _ in range(k))
        assert bits(ok_results(grpc_run(members, cols, xs, full, weights, 3))[0].tensor) == bits(plain[0].tensor)
        g_full = ok_results(gloo_run(gloo_store, [codec_of("fp32") for _ in range(k)], xs, full, weights))
        assert bits(g_full[0].tensor) == bits(g_plain[0].tensor) and g_full[0].covered is None


# ---------------------------------------------------------------- (c) invalid payloads are named


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
def test_grpc_wrong_compact_length_is_named(grpc_members, delta):
    k, n, deadline = 3, 3001, 5.0
    members, cols = grpc_members(k, codec=lambda: codec_of("int8"), chunk_bytes=1024)
    masks = scenario("overlapping", k, n, seed=3)
    xs = [compact(x, m) for x, m in zip(inputs(n, (1,) * k, seed=4, huge=1.0), masks)]
    xs[1] = torch.randn(xs[1].numel() + delta)
    outs = grpc_run(members, cols, xs, masks, (1, 1, 1), 0, deadline=deadline)
    assert_all_fail(outs, deadline)
    assert [r.culprit for r, _ in outs] == ["p1"] * k, outs
    # the same group goes on with valid payloads
    xs[1] = compact(inputs(n, (1,) * k, seed=5, huge=1.0)[1], masks[1])
    check_same(ok_results(grpc_run(members, cols, xs, masks, (1, 1, 1), 1)), n)


@pytest.mark.timeout(60)
def test_grpc_non_finite_values_are_named(grpc_members):
    k, n, deadline = 3, 3001, 3.0
    members, cols = grpc_members(k, codec=lambda: codec_of("fp32"), codecs={"p1": NaNSender}, chunk_bytes=1024)
    masks = scenario("nested", k, n, seed=3)
    xs = [compact(x, m) for x, m in zip(inputs(n, (1,) * k, seed=4, huge=1.0), masks)]
    xs[1][::5] = float("nan")
    outs = grpc_run(members, cols, xs, masks, (1, 1, 1), 0, deadline=deadline)
    assert_all_fail(outs, deadline)
    honest = [outs[i][0].culprit for i in range(k) if i != 1]
    assert "p1" in honest and set(honest) <= {"p1", None}, outs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec_name", ["fp32", "int8"])
def test_gloo_wrong_compact_length_and_non_finite_are_named(gloo_store, codec_name):
    k, n = 3, 3001
    masks = scenario("overlapping", k, n, seed=3)
    xs = [compact(x, m) for x, m in zip(inputs(n, (1,) * k, seed=4, huge=1.0), masks)]
    for bad in (torch.randn(xs[2].numel() - 1), torch.randn(xs[2].numel() + 1), xs[2].clone().fill_(float("nan"))):
        case = xs[:2] + [bad]
        outs = gloo_run(gloo_store, [codec_of(codec_name) for _ in range(k)], case, masks, (1, 1, 1), deadline=5.0)
        for r, seconds in outs:
            assert isinstance(r, CollectiveError) and r.culprit == "g2", (codec_name, r)
            assert seconds < 5.0
    # a member that holds other masks (same counts: its payload fits its own view) is named at the rendezvous
    other = masks[0].clone()
    first, last = int(torch.nonzero(other)[0]), int(torch.nonzero(~other)[-1])
    other[first], other[last] = False, True
    views = [masks, masks, (other, *masks[1:])]
    k_cols = [GlooCollective(codec_of(codec_name), timeout_margin_s=1.0) for _ in range(k)]
    members = tuple((f"g{i}", f"127.0.0.1:{20000 + i}") for i in range(k))
    qid = next(_qids)
    calls = [
        lambda i=i: k_cols[i].allreduce_mean(xs[i], Group(qid, 1, members, f"g{i}", "m", gloo_store, (), views[i]), 5.0)
        for i in range(k)
    ]
    for r, _ in run_all(calls, timeout=15):
        assert isinstance(r, CollectiveError) and r.culprit == "g2", r
    for c in k_cols:
        c.close()


def test_malformed_masks_are_refused():
    col = GrpcCollective(codec_of("fp32"), "a")
    gcol = GlooCollective(codec_of("fp32"))
    members = (("a", "127.0.0.1:1"), ("b", "127.0.0.1:2"))
    m = torch.ones(10, dtype=torch.bool)
    bad = [
        (m,),  # one mask for two members
        (m, torch.ones(11, dtype=torch.bool)),  # lengths differ
        (m, torch.ones(10, dtype=torch.uint8)),  # not bool
        (m, torch.ones(2, 5, dtype=torch.bool)),  # not 1-D
    ]
    for masks in bad:
        for c in (col, gcol):
            with pytest.raises(ValueError):
                c.allreduce_mean(torch.ones(10), Group(1, 1, members, "a", masks=masks), 1.0)
    with pytest.raises(ValueError, match="nothing to average"):
        col.allreduce_mean(torch.ones(10), Group(1, 1, members, "a", weights=(0, 0), masks=(m, None)), 1.0)
    col.close()


@pytest.mark.timeout(30)
def test_one_member_with_a_mask(grpc_members, gloo_store):
    n = 100
    m = torch.zeros(n, dtype=torch.bool)
    m[10:40] = True
    x = torch.randn(30)
    members, cols = grpc_members(1, codec=lambda: codec_of("fp32"))
    ((r, _),) = grpc_run(members, cols, [x], (m,), (1,), 0)
    assert isinstance(r, CollectiveResult) and r.bytes_sent == 0
    assert torch.equal(r.tensor[m], x) and torch.equal(r.covered, m) and not bool(r.tensor[~m].any())
    ((g, _),) = gloo_run(gloo_store, [codec_of("fp32")], [x], (m,), (1,))
    assert isinstance(g, CollectiveResult) and torch.equal(g.tensor, r.tensor) and torch.equal(g.covered, m)


# ---------------------------------------------------------------- (d) bytes follow the slice (grpc)


def slice_mask(n: int, frac: float, seed: int, kind: str) -> torch.Tensor:
    if kind == "random":
        return torch.from_numpy(np.random.default_rng(seed).random(n) < frac)
    # the first ``frac`` of each of 20 "tensors": a slice of a supernet's layers
    m = torch.zeros(n, dtype=torch.bool)
    for t in range(20):
        a, b = t * n // 20, (t + 1) * n // 20
        m[a : a + round(frac * (b - a))] = True
    return m


BYTES_CASES = [(4, 0.25, "random"), (4, 0.5, "layers"), (3, 0.25, "layers"), (2, 0.25, "random")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("k,frac,kind", BYTES_CASES)
def test_grpc_bytes_sent_follow_the_slice(grpc_members, k, frac, kind):
    """The last member covers ``frac`` of the vector, the others all of it: its bytes sent are ``frac`` of a
    full member's (to 5%; transport counters, framing included), and the counters add up."""
    n = 400_000
    members, cols = grpc_members(k, codec=lambda: codec_of("fp32"), chunk_bytes=1 << 18)
    masks = (None,) * (k - 1) + (slice_mask(n, frac, 1, kind),)
    xs = [compact(torch.randn(n), m) for m in masks]
    results = ok_results(grpc_run(members, cols, xs, masks, (1,) * k, 0))
    full, capped = results[0].bytes_sent, results[-1].bytes_sent
    covered = float(masks[-1].float().mean())
    ratio = capped / full
    print(f"\nk={k}, slice {covered:.3f} ({kind}): sent {capped} vs {full} bytes, ratio {ratio:.4f}")
    assert ratio == pytest.approx(covered, rel=0.05)
    assert sum(r.bytes_sent for r in results) == sum(r.bytes_recv for r in results)
    lay = shard_layout(masks, (1,) * k, n, 1)
    for j, r in enumerate(results):  # payload bytes from the layout; a small header per chunk
        values = sum(lay.part(j, i)[3] - lay.part(j, i)[2] for i in range(k) if i != j)
        values += (k - 1) * lay.covered_counts[j]
        assert 4 * values < r.bytes_sent <= 4 * values + 64 * (2 * k + 4 * values // (1 << 18))


# ---------------------------------------------------------------- (e) the pure helpers (hypothesis)


@st.composite
def masked_case(draw, max_k: int = 5, max_n: int = 60):
    n = draw(st.integers(0, max_n))
    k = draw(st.integers(1, max_k))
    masks: List[Mask] = []
    for _ in range(k):
        if draw(st.booleans()) and draw(st.booleans()):
            masks.append(None)
        else:
            masks.append(torch.from_numpy(draw(hnp.arrays(np.bool_, n))))
    weights = draw(st.lists(st.integers(0, 5000), min_size=k, max_size=k).filter(lambda w: sum(w) > 0))
    values = st.floats(-BIG, BIG, width=32) | st.sampled_from([0.0, -0.0, TINY, float(np.float32(-3e-40)), 1.0])
    fulls = [torch.from_numpy(draw(hnp.arrays(np.float32, n, elements=values))) for _ in range(k)]
    return n, tuple(masks), tuple(weights), fulls


@HYP
@given(masked_case())
def test_compact_and_scatter(case):
    n, masks, _, fulls = case
    for x, m in zip(fulls, masks):
        c = compact(x, m)
        assert c.numel() == masking.mask_count(m, n)
        want = x.numpy() if m is None else x.numpy()[m.numpy()]
        assert c.numpy().tobytes() == want.tobytes()
        back = scatter(c, m, n)
        where = np.ones(n, dtype=bool) if m is None else m.numpy()
        assert back.numpy()[where].tobytes() == want.tobytes() and not back.numpy()[~where].any()


@HYP
@given(masked_case())
def test_masked_weighted_mean_is_the_documented_arithmetic(case):
    n, masks, weights, fulls = case
    parts = [compact(x, m) for x, m in zip(fulls, masks)]
    got, covered = masked_weighted_mean(parts, masks, weights, n)
    want, cov = np_masked_mean([p.numpy() for p in parts], masks, weights, n)
    assert got.numpy().tobytes() == want.tobytes()
    assert (covered is None) == bool(cov.all()) and (covered is None or np.array_equal(covered.numpy(), cov))
    ws = weight_sums(masks, weights, 0, n).numpy()
    assert np.array_equal(ws > 0, cov)
    assert covered_mask(masks, weights, n) is None or np.array_equal(covered_mask(masks, weights, n), cov)
    if n:
        float64_check(
            got, [x if m is None else scatter(compact(x, m), m, n) for x, m in zip(fulls, masks)], masks, weights
        )
    # where everyone covers a coordinate, the bits of the unmasked weighted mean
    every = np.ones(n, dtype=bool)
    for m in masks:
        if m is not None:
            every &= m.numpy()
    plain = weighted_mean(fulls, weights).numpy()
    assert got.numpy()[every].tobytes() == plain[every].tobytes()


def test_weight_sums_in_chunks(monkeypatch):
    monkeypatch.setattr(masking, "CHUNK", 7)
    g = np.random.default_rng(0)
    masks = (torch.from_numpy(g.random(100) < 0.5), None, torch.from_numpy(g.random(100) < 0.2))
    parts = [compact(torch.randn(100), m) for m in masks]
    for weights in ((1, 0, 3), (0, 0, 2)):
        got, _ = masked_weighted_mean(parts, masks, weights, 100)
        want, _ = np_masked_mean([p.numpy() for p in parts], masks, weights, 100)
        assert got.numpy().tobytes() == want.tobytes()
    m = torch.from_numpy(g.random(100) < 0.3)
    ranks = sorted(g.choice(int(m.sum()), 5, replace=False).tolist())
    assert nth_true(m, ranks) == torch.nonzero(m).flatten()[ranks].tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=8), st.integers(0, 10**6))
def test_owner_sizes(counts, covered):
    counts = [min(c, covered) for c in counts] if covered else [0] * len(counts)
    sizes = owner_sizes(counts, covered)
    k = len(counts)
    assert len(sizes) == k and sum(sizes) == covered and min(sizes) >= 0
    gaps = [(k - 1) * covered - c for c in counts]
    free = [c > 0 and g <= 0 for c, g in zip(counts, gaps)]
    if any(free):
        assert all(s == 0 for s, f in zip(sizes, free) if not f)
    elif any(counts):
        q = [c / g if c else 0.0 for c, g in zip(counts, gaps)]
        for s, qi in zip(sizes, q):  # proportional to q, to within the floors
            assert abs(s - covered * qi / sum(q)) <= 1.0 + 1e-9 * covered
    if all(c == covered for c in counts) and covered and k > 2:  # all full: equal shards
        assert max(sizes) - min(sizes) <= 1


@HYP
@given(masked_case(max_n=200), st.sampled_from([1, 4, 32]))
def test_shard_layout(case, block):
    n, masks, weights, _ = case
    lay = shard_layout(masks, weights, n, block)
    k = len(masks)
    assert lay.edges[0] == 0 and lay.edges[-1] == n and list(lay.edges) == sorted(lay.edges) and len(lay.edges) == k + 1
    cov = np.ones(n, dtype=bool) if lay.covered is None else lay.covered.numpy()
    counts = [masking.mask_count(m, n) for m in masks]
    assert list(lay.covered_counts) == [int(cov[lay.edges[i] : lay.edges[i + 1]].sum()) for i in range(k)]
    assert sum(lay.covered_counts) == int(cov.sum())
    assert lay.covered_counts == tuple(owner_sizes(counts, int(cov.sum())))
    for j, m in enumerate(masks):
        where = np.ones(n, dtype=bool) if m is None else m.numpy()
        for i in range(k):
            assert lay.offsets[j][i] == int(where[: lay.edges[i]].sum())
            lo, hi, a, b = lay.part(j, i)
            assert (lo, hi) == (lay.offsets[j][i], lay.offsets[j][i + 1])
            if lo == hi:
                assert a == b
            else:
                assert a <= lo < hi <= b <= counts[j] and a % block == 0 and (b % block == 0 or b == counts[j])
                assert lo - a < block and b - hi < block
        assert lay.offsets[j][k] == counts[j]
    # uncovered coordinates belong to the shard of the covered ones before them
    for i in range(1, k):
        e = lay.edges[i]
        assert e == n or cov[e] or e == 0


def test_shard_rule_examples():
    n = 1100
    # three full members and one 25% slice (k = 4): shares 1/2, 1/2, 1/2, 1/11
    sizes = owner_sizes([n, n, n, n // 4], n)
    assert abs(sizes[3] / sizes[0] - (1 / 11) / (1 / 2)) < 0.01
    # k = 2 with a full member: it owns everything
    assert owner_sizes([n, n // 4], n) == [n, 0]
    assert owner_sizes([n, n], n) == [n // 2, n - n // 2]
    # all full, k = 3: equal thirds
    assert owner_sizes([900, 900, 900], 900) == [300, 300, 300]
    # a member that covers nothing owns nothing
    assert owner_sizes([900, 0, 900], 900)[1] == 0
    assert owner_sizes([0, 0], 0) == [0, 0]


def test_group_masks_field():
    members = (("a", "x:1"), ("b", "x:2"))
    m = torch.ones(4, dtype=torch.bool)
    g = Group(1, 0, members, "b", masks=(m, None))
    assert g.masked and g.mask(0) is m and g.mask(1) is None
    assert not Group(1, 0, members, "b").masked and Group(1, 0, members, "b").mask(1) is None
    assert not Group(1, 0, members, "b", masks=(None, None)).masked
    assert g == Group(1, 0, members, "b")  # masks are derived data: not compared, not in repr
    assert "masks" not in repr(g)
