"""The single-peer trainer: determinism, resume, records, checkpoints, loggers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dtrain import checkpoint as ckpt_mod
from dtrain.obs.metrics import read_metrics
from dtrain.train.loop import Trainer, train

from conftest import fast_cfg

pytestmark = pytest.mark.timeout(300)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _run(cfg):
    t = Trainer(cfg)
    try:
        t.run()
    finally:
        t.close()
    return t


def test_two_runs_are_bit_identical(tmp_path):
    a = _run(fast_cfg(tmp_path, "steps=4", "eval_every=2", name="a"))
    b = _run(fast_cfg(tmp_path, "steps=4", "eval_every=0", name="b"))  # evaluation must not matter
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_equals_straight_run(tmp_path):
    straight = _run(fast_cfg(tmp_path, "steps=6", "eval_every=0", name="straight"))
    first = _run(fast_cfg(tmp_path, "steps=6", "stop_at=3", "eval_every=0", name="resumed"))
    assert first.step == 3
    second = _run(fast_cfg(tmp_path, "steps=6", "resume=true", "eval_every=0", name="resumed"))
    assert second.step == 6
    ps, pr = _params(straight), _params(second)
    assert all(torch.equal(ps[k], pr[k]) for k in ps)
    recs = list(read_metrics(str(tmp_path / "resumed" / "metrics.jsonl")))
    assert any(r["kind"] == "run" and r["event"] == "resume" and r["step"] == 3 for r in recs)


def test_resume_refuses_another_model(tmp_path):
    from dtrain.config import ConfigError

    _run(fast_cfg(tmp_path, "steps=2", "eval_every=0", name="r"))
    with pytest.raises(ConfigError, match="another model config"):
        _run(fast_cfg(tmp_path, "steps=4", "resume=true", "model.feature_dim=64", name="r"))


def test_metrics_records_have_their_fields(tmp_path):
    cfg = fast_cfg(tmp_path, "steps=4", "eval_every=2", "sandwich.num_random=2", "eval_archs=[max,min,rand0]")
    summary = train(cfg)
    recs = list(read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl")))
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert isinstance(r["lr"], float) and r["samples_per_s"] > 0
        assert set(r["loss"]) == {"max", "min", "rand0", "rand1"}
    evals = [r for r in recs if r["kind"] == "eval"]
    assert {r["arch_name"] for r in evals} == {"max", "min", "rand0"}
    for r in evals:
        assert {"step", "arch_name", "arch", "acc", "loss", "params", "macs"} <= set(r)
        assert 0.0 <= r["acc"] <= 1.0 and r["params"] > 0 and r["macs"] > 0
    assert {r["split"] for r in evals} == {"val", "test"}
    assert summary["finished"] and set(summary["results"]) >= {"max", "min"}
    saved = json.load(open(os.path.join(cfg.run_dir, "summary.json")))
    assert saved["step"] == 4
    assert os.path.exists(os.path.join(cfg.run_dir, "checkpoints", "latest.pt"))
    assert json.load(open(os.path.join(cfg.run_dir, "config.json")))["steps"] == 4


def test_schedules_run_end_to_end(tmp_path):
    for sched in ("delayed", "progressive"):
        cfg = fast_cfg(tmp_path, "steps=8", "eval_every=0", f"sandwich={sched}", name=sched)
        train(cfg)
        steps = [r for r in read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["kind"] == "step"]
        assert set(steps[0]["loss"]) == {"max"}  # full net alone at first
        assert "min" in steps[-1]["loss"]


def test_alpha_divergence_and_sgd_run(tmp_path):
    cfg = fast_cfg(tmp_path, "steps=2", "eval_every=0", "sandwich=alphanet", "optim=sgd")
    assert train(cfg)["finished"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt_mod.save_checkpoint(path, {"x": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(path, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(ckpt_mod.load_checkpoint(path)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


def test_wandb_offline_logger(tmp_path):
    pytest.importorskip("wandb")
    cfg = fast_cfg(tmp_path, "steps=2", "eval_every=0", "logger=wandb", "logger.wandb.mode=offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    train(cfg)
    wandb_dir = os.path.join(cfg.run_dir, "wandb")
    assert os.path.isdir(wandb_dir)
    runs = [d for d in os.listdir(wandb_dir) if d.startswith("offline-run")]
    assert runs, os.listdir(wandb_dir)


def test_model_data_mismatch_is_one_line(tmp_path):
    from dtrain.data.base import DataError

    with pytest.raises(DataError, match="model.num_classes=7"):
        Trainer(fast_cfg(tmp_path, "steps=1", "model.num_classes=7"))
    with pytest.raises(DataError, match="does classification but data .text. is lm"):
        Trainer(fast_cfg(tmp_path, "steps=1", "data=text"))


def test_batch_must_split_evenly(tmp_path):
    from dtrain.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size=15"):
        Trainer(fast_cfg(tmp_path, "steps=1", "batch_size=15", "grad_accum=2"))


def test_grad_accum_matches_full_batch_without_bn_effects(tmp_path):
    """grad_accum=2 over micro-batches of 4 trains what one batch of 8 trains (the same sandwich, the same
    gradient up to float32 summation order): the gpt space has no batch statistics (LayerNorm only), so
    nothing but the summation order differs. The 2-rank equivalence is in test_torchrun."""
    from conftest import compose

    def gpt(name, *extra):
        return compose(
            [f"run_dir={tmp_path / name}", "+experiment=gpt_text", "model.block_size=16", "data.max_bytes=20000"]
            + ["steps=2", "eval_every=0", "batch_size=8", "threads=1", "logger.progress=off", "checkpoint_every=0"]
            + ["calib_batches=1", "eval_batch_size=16", *extra]
        )

    full, accum = _params(_run(gpt("full"))), _params(_run(gpt("accum", "grad_accum=2")))
    moved = max((full[k] - accum[k]).abs().max().item() for k in full if full[k].is_floating_point())
    assert moved < 1e-5, moved
    again = _params(_run(gpt("again", "grad_accum=2")))
    assert all(torch.equal(accum[k], again[k]) for k in accum)  # and it reproduces itself bit for bit


def test_synthetic_rgb_data_trains(tmp_path):
    cfg = fast_cfg(
        tmp_path,
        "steps=2",
        "eval_every=0",
        "data=synthetic",
        "data.num_samples=64",
        "data.shape=[3,8,8]",
        "model.in_channels=3",
    )
    assert train(cfg)["finished"]


def test_cifar10_binary_directory_trains(tmp_path):
    import numpy as np

    from dtrain.data.cifar10 import write_cifar10_binary

    rng = np.random.default_rng(0)
    root = tmp_path / "cifar"
    root.mkdir()
    write_cifar10_binary(
        root / "data_batch_1.bin", rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 40)
    )
    write_cifar10_binary(
        root / "test_batch.bin", rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 10)
    )
    cfg = fast_cfg(tmp_path, "steps=2", "eval_every=0", "data=cifar10", f"data.root={root}", "model.in_channels=3")
    summary = train(cfg)
    assert summary["finished"] and "test_acc" in summary["results"]["max"]
