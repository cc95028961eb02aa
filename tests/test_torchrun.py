"""Several ranks in one peer (torchrun, gloo on CPU): one all-reduce per step, identical
parameters on every rank, and the same result as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST_MBV3, REPO

pytestmark = pytest.mark.timeout(420)

COMMON = [
    *FAST_MBV3,
    "model.dropout=0.1",
    "steps=4",
    "batch_size=16",
    "eval_every=0",
    "calib_batches=2",
    "calib_batch_size=8",
    "checkpoint_every=0",
    "threads=1",
]


def _run(args, tmp_path, name, nproc=1):
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "dtrain.cli.train", f"run_dir={run_dir}", *COMMON, *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "dtrain.cli.train",
            f"run_dir={run_dir}",
            *COMMON,
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.load(open(run_dir / "summary.json"))
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    return summary, state["model"]


def test_two_ranks_match_one_process(tmp_path):
    # SGD: Adam's m / (sqrt(v) + eps) turns float noise in near-zero gradients (zero-init
    # BN gammas) into lr-sized steps, which would hide a real mismatch behind a loose tolerance
    two, p2 = _run(["optim=sgd"], tmp_path, "two", nproc=2)
    assert two["world_size"] == 2
    assert two["ranks_in_sync"] and len(set(two["rank_param_hashes"])) == 1
    # exactly one (bucketed) gradient all-reduce per sandwich step, whatever the sandwich size
    assert two["grad_buckets"] == 1 and two["grad_allreduce_calls"] == 4

    one, p1 = _run(["optim=sgd", "grad_accum=2"], tmp_path, "one")
    assert one["world_size"] == 1
    for k, v in p1.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BN statistics are per rank until recalibrated
        torch.testing.assert_close(p2[k], v, atol=1e-6, rtol=1e-5, msg=k)
    # evaluation: each rank recalibrates BN on its share of the calibration batches and
    # evaluates every other batch; the averaged statistics and summed counts give the
    # numbers one process gets from all of them
    for name in ("max", "min"):
        for key in ("val_acc", "test_acc"):
            assert abs(two["results"][name][key] - one["results"][name][key]) < 1e-9, (name, key)


@pytest.mark.acceptance  # a second 2-rank torchrun job; launch/torchrun.sh itself is tested in test_launch.py
def test_launch_script_and_many_buckets(tmp_path):
    script = os.path.join(REPO, "launch", "torchrun_peer.sh")
    bad = subprocess.run([script, "two"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "OMP_NUM_THREADS": "1",
    }
    run_dir = tmp_path / "script"
    # small buckets and a bigger sandwich: still one synchronisation (of several buckets) per step
    p = subprocess.run(
        [script, "2", f"run_dir={run_dir}", *COMMON, "steps=2", "bucket_mb=0.01", "sandwich.num_random=3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.load(open(run_dir / "summary.json"))
    assert s["world_size"] == 2 and s["ranks_in_sync"]
    assert s["grad_buckets"] > 1 and s["grad_allreduce_calls"] == 2 * s["grad_buckets"]
