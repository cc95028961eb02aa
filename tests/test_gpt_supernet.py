"""Tests of the gpt search space and supernet: arch validation and counting, supernet ==
extracted static model (also scripted), analytical cost, regularisation switch, clean
teacher output, gradients confined to the active slice, and a short training run."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtrain.config import GPTConfig
from dtrain.supernet import ArchError, build_supernet
from dtrain.supernet.gpt_net import GPTSupernet
from dtrain.supernet.gpt_space import GPTSpace
from dtrain.supernet.static_gpt import CausalSelfAttention

TINY = dict(block_size=16, depths=[1, 2], embed_dims=[16, 32], heads=[1, 2], head_dim=8, mlp_ratios=[2, 4])


def tiny_cfg(**over) -> GPTConfig:
    return GPTConfig(**{**TINY, **over})


@functools.lru_cache(maxsize=None)
def tiny_net(seed: int = 0, bias: bool = True) -> GPTSupernet:
    torch.manual_seed(seed)
    return GPTSupernet(tiny_cfg(bias=bias))


def tokens(batch: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def enumerate_archs(space: GPTSpace):
    """Every raw arch of the space (before canonicalisation)."""
    n = space.max_depth
    for d, e in itertools.product(space.depths, space.embed_dims):
        for hs in itertools.product(space.heads, repeat=n):
            for rs in itertools.product(space.mlp_ratios, repeat=n):
                yield {"depth": d, "embed": e, "heads": list(hs), "mlp_ratio": list(rs)}


# --------------------------------------------------------------------------- space


def test_build_supernet_dispatches_gpt():
    net = build_supernet({"space": "gpt", **TINY})
    assert isinstance(net, GPTSupernet) and net.task == "lm" and net.space.name == "gpt"
    assert net.active_arch == net.space.max()


def test_validate_accepts_and_canonicalises():
    space = GPTSpace.from_config(tiny_cfg())
    arch = {"depth": 1, "embed": 16, "heads": [1, 1], "mlp_ratio": [2, 2]}
    out = space.validate(arch)
    assert out == {"depth": 1, "embed": 16, "heads": [1, 2], "mlp_ratio": [2, 4]}
    assert arch["heads"] == [1, 1]  # input untouched
    assert space.validate(space.max()) == space.max()


@pytest.mark.parametrize(
    "change,key",
    [
        ({"width": 3}, "width"),
        ({"depth": 3}, "depth"),
        ({"depth": True}, "depth"),
        ({"embed": 24}, "embed"),
        ({"heads": [1, 3]}, "heads"),
        ({"mlp_ratio": [2, 3]}, "mlp_ratio"),
        ({"heads": [1]}, "heads"),
        ({"mlp_ratio": [2, 2, 2]}, "mlp_ratio"),
        ({"heads": 2}, "heads"),
    ],
)
def test_validate_rejects(change, key):
    space = GPTSpace.from_config(tiny_cfg())
    arch = {**space.max(), **change}
    with pytest.raises(ArchError) as err:
        space.validate(arch)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_validate_rejects_missing_key_and_non_dict():
    space = GPTSpace.from_config(tiny_cfg())
    arch = space.max()
    del arch["embed"]
    with pytest.raises(ArchError, match="embed"):
        space.validate(arch)
    with pytest.raises(ArchError):
        space.validate([1, 2])


@settings(max_examples=25, deadline=None)
@given(
    depths=st.sets(st.integers(1, 3), min_size=1),
    embeds=st.sets(st.integers(1, 9), min_size=1),
    heads=st.sets(st.integers(1, 4), min_size=1, max_size=3),
    ratios=st.sets(st.integers(1, 4), min_size=1, max_size=2),
)
def test_size_matches_enumeration(depths, embeds, heads, ratios):
    space = GPTSpace(depths, embeds, heads, ratios)
    canonical = {space.key(a) for a in enumerate_archs(space)}
    assert space.size() == len(canonical)


def test_tiny_size():
    assert GPTSpace.from_config(tiny_cfg()).size() == 2 * (4 + 16)


def test_sample_canonical_deterministic_and_covering():
    space = GPTSpace.from_config(tiny_cfg())
    rng = random.Random(7)
    seen = set()
    for _ in range(2000):
        a = space.sample(rng)
        assert space.validate(a) == a
        seen.add(space.key(a))
    assert space.key(space.max()) in seen and space.key(space.min()) in seen
    assert len(seen) == space.size()
    r1, r2 = random.Random(3), random.Random(3)
    assert [space.sample(r1) for _ in range(20)] == [space.sample(r2) for _ in range(20)]


def test_sample_and_min_respect_elastic():
    space = GPTSpace.from_config(tiny_cfg(depths=[1, 2, 3]))
    rng = random.Random(0)
    for _ in range(200):
        a = space.sample(rng, elastic=["embed"])
        assert a["depth"] == 3 and a["heads"] == [2] * 3 and a["mlp_ratio"] == [4] * 3
    assert {space.sample(rng, elastic=["embed"])["embed"] for _ in range(100)} == {16, 32}
    m = space.min(elastic=["heads", "depth"])
    assert m == {"depth": 1, "embed": 32, "heads": [1, 2, 2], "mlp_ratio": [4, 4, 4]}
    assert space.min() == {"depth": 1, "embed": 16, "heads": [1, 2, 2], "mlp_ratio": [2, 4, 4]}
    with pytest.raises(ArchError, match="kernel"):
        space.sample(rng, elastic=["kernel"])


def test_active_layers():
    space = GPTSpace.from_config(tiny_cfg(depths=[1, 2, 3]))
    arch = space.validate({"depth": 2, "embed": 16, "heads": [1, 2, 1], "mlp_ratio": [4, 2, 2]})
    assert list(space.active_layers(arch)) == [(0, 1, 4), (1, 2, 2)]


# --------------------------------------------------------------------------- extraction


def _check_equivalent(net: GPTSupernet, arch: dict) -> None:
    net.eval()
    x = tokens()
    static = net.extract(arch)
    net.set_active(arch)  # extract() leaves the active arch as it was
    assert not static.training
    with torch.no_grad():
        y = net(x)
        z = static(x)
        s = torch.jit.script(static)(x)
    assert y.shape == (3, 16, 256)
    torch.testing.assert_close(z, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, y, atol=1e-5, rtol=0)
    # shorter sequences work too
    with torch.no_grad():
        torch.testing.assert_close(static(x[:, :5]), net(x[:, :5]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["max", "min"])
@pytest.mark.parametrize("bias", [True, False])
def test_extract_matches_supernet_extremes(which, bias):
    net = tiny_net(bias=bias)
    _check_equivalent(net, getattr(net.space, which)())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_extract_matches_supernet_sampled(seed):
    net = tiny_net()
    _check_equivalent(net, net.space.sample(random.Random(seed)))


def test_extract_is_plain_and_follows_mode():
    net = tiny_net()
    net.train()
    before = net.active_arch
    static = net.extract(net.space.min())
    assert static.training
    assert static.lm_head.weight is static.tok_emb.weight  # tie preserved
    kinds = {type(m) for m in static.modules()}
    assert not any(t.__module__.startswith("dtrain.supernet.elastic") for t in kinds)
    net.eval()
    assert net.active_arch == before  # extract() does not change the active arch


def test_too_long_input_raises():
    net = tiny_net()
    net.set_active(net.space.max())
    with pytest.raises(ValueError, match="block_size"):
        net(tokens(1, 17))
    with pytest.raises(ValueError, match="block_size"):
        net.extract()(tokens(1, 17))


# --------------------------------------------------------------------------- cost


def _hooked_macs(static: nn.Module, T: int) -> int:
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        macs += inp[0].numel() // mod.in_features * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in static.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        static(tokens(1, T))
    for h in handles:
        h.remove()
    attn = sum(2 * T * T * m.n_heads * m.head_dim for m in static.modules() if isinstance(m, CausalSelfAttention))
    return macs + attn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_cost_matches_extracted(bias, seed):
    net = tiny_net(bias=bias).eval()
    space = net.space
    arch = space.max() if seed is None else space.sample(random.Random(seed))
    static = net.extract(arch)
    cost = net.cost(arch)
    assert cost["params"] == sum(p.numel() for p in static.parameters())
    assert cost["macs"] == _hooked_macs(static, net.cfg.block_size)
    assert net.cost(space.min())["macs"] < net.cost(space.max())["macs"]


# --------------------------------------------------------------------------- regularisation


def test_regularisation_only_inside_context():
    torch.manual_seed(0)
    net = GPTSupernet(tiny_cfg(dropout=0.2, drop_path=0.1)).train()
    x = tokens()
    assert net.teacher_needs_extra_forward()
    with torch.no_grad():
        with net.regularized():
            assert net.regularizing
            assert not torch.equal(net(x), net(x))
        assert torch.equal(net(x), net(x))
        net.eval()
        with net.regularized():
            assert not net.regularizing
            assert torch.equal(net(x), net(x))


def test_drop_path_rates_grow_linearly():
    net = GPTSupernet(tiny_cfg(depths=[1, 2, 4], drop_path=0.2))
    rates = [b.drop_path_rate for b in net.blocks]
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2])


def test_return_clean():
    net = tiny_net().train()
    net.set_active(net.space.max())
    x = tokens()
    assert not net.teacher_needs_extra_forward()
    with net.regularized():
        logits, clean = net(x, return_clean=True)
    assert logits.requires_grad and not clean.requires_grad
    assert torch.equal(logits.detach(), clean)

    reg = GPTSupernet(tiny_cfg(dropout=0.1)).train()
    out, clean = reg(x, return_clean=True)  # not regularising: allowed
    assert torch.equal(out.detach(), clean) and not clean.requires_grad
    with reg.regularized(), pytest.raises(RuntimeError, match="teacher"):
        reg(x, return_clean=True)


# --------------------------------------------------------------------------- gradients


def test_gradients_stay_in_active_slice():
    torch.manual_seed(0)
    net = GPTSupernet(tiny_cfg()).train()
    arch = {"depth": 1, "embed": 16, "heads": [1, 2], "mlp_ratio": [2, 4]}
    net.set_active(arch)
    x = tokens(2, 10)
    loss = F.cross_entropy(net(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    e, a, hidden = 16, 8, 32
    g = net.tok_emb.weight.grad
    assert g[:, :e].abs().sum() > 0 and g[:, e:].abs().sum() == 0
    g = net.pos_emb.weight.grad
    assert g[:10, :e].abs().sum() > 0 and g[:, e:].abs().sum() == 0 and g[10:].abs().sum() == 0
    b0 = net.blocks[0]
    qkv = b0.attn.qkv.weight.grad
    assert qkv[: 3 * a, :e].abs().sum() > 0
    assert qkv[3 * a :].abs().sum() == 0 and qkv[:, e:].abs().sum() == 0
    proj = b0.attn.proj.weight.grad
    assert proj[e:].abs().sum() == 0 and proj[:, a:].abs().sum() == 0
    fc1, fc2 = b0.mlp.fc1.weight.grad, b0.mlp.fc2.weight.grad
    assert fc1[hidden:].abs().sum() == 0 and fc1[:, e:].abs().sum() == 0
    assert fc2[e:].abs().sum() == 0 and fc2[:, hidden:].abs().sum() == 0
    for ln in (b0.ln1, b0.ln2, net.ln_f):
        assert ln.weight.grad[e:].abs().sum() == 0
    assert all(p.grad is None for p in net.blocks[1].parameters())


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    net = GPTSupernet(GPTConfig(depths=[4], embed_dims=[128], heads=[4], head_dim=32, mlp_ratios=[4]))
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert std(net.tok_emb.weight) == pytest.approx(0.02, rel=0.05)
    assert std(net.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.05)
    assert std(net.blocks[0].mlp.fc2.weight) == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert std(net.blocks[0].attn.proj.weight) == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert net.blocks[0].attn.qkv.bias.abs().sum() == 0


# --------------------------------------------------------------------------- training


def test_short_training_lowers_loss():
    torch.manual_seed(0)
    net = GPTSupernet(tiny_cfg()).train()
    net.set_active(net.space.max())
    data = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1)).repeat(4, 1)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
