"""dtrain-train from the shell: overrides, one-line errors, a real short run."""

from __future__ import annotations

import json
import os

import pytest

from dtrain.cli.train import main

from conftest import FAST_MBV3, run_cli

pytestmark = pytest.mark.timeout(300)


def _fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("dtrain-train: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_unknown_key_names_allowed_keys(capsys):
    err = _fails(capsys, "model.foo=1")
    assert "'model.foo'" in err and "kernel_sizes" in err


def test_wrong_type(capsys):
    err = _fails(capsys, "optim.lr=abc")
    assert "optim.lr" in err and "abc" in err


def test_unknown_group_option_lists_choices(capsys):
    err = _fails(capsys, "model=resnet")
    assert "resnet" in err and "mbv3_tiny" in err and "gpt_tiny" in err and "schema" not in err


def test_bad_value(capsys):
    err = _fails(capsys, "sandwich.num_random=-1")
    assert "sandwich.num_random=-1" in err and ">= 0" in err
    err = _fails(capsys, "sandwich.distill=magic")
    assert "kd, alpha, none" in err
    err = _fails(capsys, "model.kernel_sizes=[3,4]")
    assert "model.kernel_sizes" in err


def test_missing_mandatory_value(capsys):
    err = _fails(capsys, "data=cifar10")
    assert "data.root" in err and "not set" in err


def test_runtime_user_errors_are_one_line(capsys, tmp_path):
    err = _fails(
        capsys,
        "data=cifar10",
        f"data.root={tmp_path}/nowhere",
        f"run_dir={tmp_path}/r",
        *FAST_MBV3,
        "model.in_channels=3",
    )
    assert "nowhere" in err
    err = _fails(capsys, "eval_archs=[biggest]", f"run_dir={tmp_path}/r2", *FAST_MBV3)
    assert "biggest" in err and "rand<k>" in err


def test_console_script_runs_and_fails_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli(
        [
            "dtrain-train",
            f"run_dir={run_dir}",
            "steps=3",
            "eval_every=0",
            "batch_size=16",
            "calib_batches=2",
            "calib_batch_size=16",
            *FAST_MBV3,
        ],
        timeout=240,
    )
    assert p.returncode == 0, p.stderr
    assert "test acc" in p.stdout and "max" in p.stdout and "min" in p.stdout
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert any(r["kind"] == "eval" and r["arch_name"] == "min" for r in recs)
    assert os.path.exists(run_dir / ".hydra" / "config.yaml")

    bad = run_cli(["dtrain-train", "model.bogus=1"], timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert not bad.stdout.strip()


def test_help_goes_to_hydra():
    p = run_cli(["dtrain-train", "--help"], timeout=120)
    assert p.returncode == 0
    assert "model: " in p.stdout or "Configuration groups" in p.stdout


def test_added_keys_are_refused(capsys):
    err = _fails(capsys, "+optim.lrr=1")
    assert "'optim.lrr'" in err and "lr" in err
    err = _fails(capsys, "+foo=1")
    assert "'foo'" in err
