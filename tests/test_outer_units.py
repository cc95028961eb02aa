"""Outer-loop building blocks: the outer optimizer, flat layouts, the global state,
the inner optimizer's flat state, and the outer config checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dtrain.config import ConfigError, OuterConfig
from dtrain.outer.flat_params import FlatLayout
from dtrain.outer.global_state import GlobalState, StateError
from dtrain.outer.outer_opt import OuterNesterov
from dtrain.peer.optim_state import load_optimizer_flat_state, optimizer_flat_state


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_nesterov_matches_torch_sgd(nesterov):
    torch.manual_seed(0)
    theta = torch.randn(50)
    ref = theta.clone().requires_grad_()
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    v = torch.zeros(50)
    opt = OuterNesterov(0.7, 0.9, nesterov)
    for r in range(5):
        g = torch.randn(50)
        opt.step(theta, v, g, round=r)
        ref.grad = g.clone()
        sgd.step()
        torch.testing.assert_close(theta, ref.detach(), atol=1e-6, rtol=1e-6)


def test_outer_lr_schedule():
    opt = OuterNesterov(0.7, 0.9, True, schedule="cosine", total_rounds=11, min_lr_ratio=0.1)
    assert opt.lr_at(0) == pytest.approx(0.7)
    assert opt.lr_at(10) == pytest.approx(0.07)
    assert opt.lr_at(5) == pytest.approx(0.7 * (0.1 + 0.9 * 0.5))
    with pytest.raises(ValueError, match="constant or cosine"):
        OuterNesterov(schedule="step")


def test_outer_step_is_bit_reproducible():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        theta = torch.randn(1000, generator=torch.Generator().manual_seed(2))
        v = torch.zeros(1000)
        OuterNesterov().step(theta, v, g, 0)
        outs.append(theta.numpy().tobytes() + v.numpy().tobytes())
    assert outs[0] == outs[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


@pytest.mark.parametrize("fragments", [1, 2, 3, 5, 50])
def test_flat_layout_fragments_cover_parameters(fragments):
    m = _model()
    layout = FlatLayout(m, fragments)
    frags = layout.fragments
    assert frags[0][0] == 0 and frags[-1][1] == layout.numel
    assert all(a[1] == b[0] for a, b in zip(frags, frags[1:]))
    assert len(frags) == min(fragments, len(list(m.parameters())))
    flat = layout.flatten(m)
    for f, (lo, hi) in enumerate(frags):
        assert torch.equal(layout.fragment_of(m, f), flat[lo:hi])
        layout.load_fragment(m, flat[lo:hi] * 2, f)
    assert torch.equal(layout.flatten(m), flat * 2)


def test_global_state_snapshot_round_trip_and_refusals():
    a = GlobalState([("theta", torch.randn(100)), ("velocity", torch.zeros(100))], round=7)
    snap = a.snapshot({"x": 1})
    assert snap.state_hash == a.hash() and snap.round == 7
    b = GlobalState([("theta", torch.zeros(100)), ("velocity", torch.zeros(100))])
    b.adopt(snap)
    assert b.hash() == a.hash() and b.round == 7
    assert torch.equal(b.tensors["theta"], a.tensors["theta"])
    wrong = GlobalState([("theta", torch.zeros(99)), ("velocity", torch.zeros(99))])
    with pytest.raises(StateError, match="expected float32 of 396 bytes"):
        wrong.adopt(snap)
    other = GlobalState([("theta", torch.zeros(100))])
    with pytest.raises(StateError, match="tensors"):
        other.adopt(snap)
    from dtrain.wire.snapshot import StateSnapshot

    lying = StateSnapshot(snap.round, snap.payload, snap.meta_json, snap.blobs, state_hash="0" * 64)
    before = b.hash()
    with pytest.raises(StateError, match="hashes to"):
        b.adopt(lying)
    assert b.hash() == before  # a refused state changes nothing


def test_global_state_hash_tracks_every_change():
    s = GlobalState([("theta", torch.zeros(10)), ("velocity", torch.zeros(10))], round=3)
    h = s.hash()
    nxt = s.outer_step(torch.ones(4), (2, 6), OuterNesterov(0.7, 0.9))
    assert s.hash() == h and s.round == 3  # computing S_{r+1} leaves S_r as it was
    assert nxt.round == 4 and nxt.hash() != h
    assert torch.equal(nxt.tensors["theta"][:2], torch.zeros(2))
    assert torch.equal(nxt.tensors["theta"][6:], torch.zeros(4))
    s.install(nxt)
    assert s.round == 4 and s.hash() == nxt.hash() == GlobalState(list(nxt.tensors.items()), round=4).hash()
    s.replace({"theta": torch.ones(10), "velocity": torch.zeros(10)}, round=9)
    assert s.round == 9 and s.hash() == GlobalState([("theta", torch.ones(10)), ("velocity", torch.zeros(10))]).hash()
    with pytest.raises(StateError):
        s.replace({"theta": torch.ones(11), "velocity": torch.zeros(11)}, round=1)
    with pytest.raises(StateError):
        s.install(GlobalState([("theta", torch.zeros(10))], round=1))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_flat_state_round_trip(name):
    m = _model()
    opt = (
        torch.optim.AdamW(m.parameters(), lr=0.1)
        if name == "adamw"
        else torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    )
    m(torch.randn(4, 6)).sum().backward()
    opt.step()
    flat = optimizer_flat_state(opt, list(m.parameters()))
    m2 = _model()
    opt2 = (
        torch.optim.AdamW(m2.parameters(), lr=0.1)
        if name == "adamw"
        else torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    )
    load_optimizer_flat_state(opt2, list(m2.parameters()), flat)
    again = optimizer_flat_state(opt2, list(m2.parameters()))
    for (n1, t1), (n2, t2) in zip(flat, again):
        assert n1 == n2 and torch.equal(t1, t2)


def test_outer_config_checks():
    with pytest.raises(ConfigError, match="multiple of outer.fragments=3"):
        OuterConfig(name="diloco", sync_every=10, fragments=3)
    with pytest.raises(ConfigError, match="outer.overlap_steps"):
        OuterConfig(name="diloco", sync_every=8, fragments=4, overlap_steps=2)
    with pytest.raises(ConfigError, match="outer.codec"):
        OuterConfig(codec="int2")
    OuterConfig(name="diloco", sync_every=8, fragments=4, overlap_steps=1)


_OUTER_STEP_CHILD = r"""
import hashlib, numpy as np, torch
from dtrain.outer.outer_opt import OuterNesterov
rng = np.random.default_rng(7)
theta, v, g = (torch.from_numpy(rng.standard_normal(50_003).astype(np.float32)) for _ in range(3))
for nesterov in (True, False):
    OuterNesterov(0.7, 0.9, nesterov).step(theta, v, g, round=0)
digest = hashlib.sha256(theta.numpy().tobytes() + v.numpy().tobytes()).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def test_outer_step_bits_do_not_depend_on_the_cpu_capability():
    """Peers on different CPUs apply the same outer step: torch's scalar kernels (``ATEN_CPU_CAPABILITY=default``)
    and this machine's vectorised ones give the same bits (no fused multiply-add)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for capability in ("default", ""):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update(PYTHONPATH=repo, OMP_NUM_THREADS="1", **({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
        out = subprocess.run(
            [sys.executable, "-c", _OUTER_STEP_CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.split())
    assert runs[0][0] == "DEFAULT" and runs[1][0] != "DEFAULT"
    assert runs[0][1] == runs[1][1]


def test_uncovered_coordinates_keep_their_value_and_their_momentum():
    """Capacity-aware rounds: coordinates no member trained keep theta and velocity (momentum frozen, not
    decayed); covered ones take exactly the step an uncapped round would give them."""
    g = torch.Generator().manual_seed(3)
    state = GlobalState([("theta", torch.randn(50, generator=g)), ("velocity", torch.randn(50, generator=g))], round=4)
    mean = torch.randn(50, generator=g)
    covered = torch.rand(50, generator=g) < 0.6
    opt = OuterNesterov(0.7, 0.9)
    masked, full = state.outer_step(mean, (0, 50), opt, covered), state.outer_step(mean, (0, 50), opt)
    for name in ("theta", "velocity"):
        assert torch.equal(masked.tensors[name][covered], full.tensors[name][covered])
        assert torch.equal(masked.tensors[name][~covered], state.tensors[name][~covered])
    everything = state.outer_step(mean, (0, 50), opt, torch.ones(50, dtype=torch.bool))
    assert everything.hash() == full.hash() and masked.round == 5
