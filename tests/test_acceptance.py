"""The acceptance runs: the default training, the GPT text preset and the default simulation (`make demo`).

These run the real commands with their shipped defaults (about 2 and 1.5 minutes
on 2 cores; the timings are printed, not asserted). They are kept out of
``make test`` to hold the suite under 10 minutes: run them with ``make acceptance``.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]


def test_default_run_reaches_accuracy_targets(tmp_path):
    run_dir = tmp_path / "default"
    t0 = time.time()
    p = run_cli(["dtrain-train", f"run_dir={run_dir}"], timeout=580)
    elapsed = time.time() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(run_dir / "summary.json"))["results"]
    print(
        f"default dtrain-train: {elapsed:.0f} s, max test acc {res['max']['test_acc']:.4f}, "
        f"min test acc {res['min']['test_acc']:.4f}"
    )
    assert res["max"]["test_acc"] >= 0.95
    assert res["min"]["test_acc"] >= 0.92


def test_gpt_preset_beats_unigram_by_a_quarter(tmp_path):
    run_dir = tmp_path / "gpt"
    p = run_cli(["dtrain-train", "+experiment=gpt_text", f"run_dir={run_dir}"], timeout=580)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(run_dir / "summary.json"))["results"]
    unigram = res["unigram_bpb"]
    print(f"gpt_text: val bpb max {res['max']['val_bpb']:.3f} min {res['min']['val_bpb']:.3f}, unigram {unigram:.3f}")
    assert res["max"]["val_bpb"] <= 0.75 * unigram
    assert res["min"]["val_bpb"] <= 0.75 * unigram


def test_make_demo_simulation_survives_a_crash_and_a_join(tmp_path):
    """`make demo` is the default dtrain-sim: 3 peers, one SIGKILLed, one joining; under 3 minutes on 2 cores."""
    run_dir = tmp_path / "demo"
    t0 = time.time()
    p = run_cli(["dtrain-sim", f"run_dir={run_dir}"], timeout=580)
    elapsed = time.time() - t0
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    s = json.load(open(run_dir / "summary.json"))
    print(
        f"default dtrain-sim: {elapsed:.0f} s, {s['rounds_committed']} rounds, heals {s['heals']}, "
        f"accuracy {s['final_accuracy']}"
    )
    assert s["ok"] and s["parity"] and s["rounds_lost"] == 0
    assert s["faults"] == {"kill_kill": 1} and s["heals"] >= 1
    assert elapsed < 180
