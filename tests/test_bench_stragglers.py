"""bench/stragglers.py runs end to end in its tiny mode: three dtrain-sim runs (rows a, b, c), the
printed tables, the ``--json`` report with every target of the spec, balanced steps in row (c), and
no process left behind, pass or fail."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, sigint_default
from sim_fixtures import alive, started_pids

BENCH = os.path.join(REPO, "bench", "stragglers.py")
TARGETS = {
    "c_round_time_vs_a",
    "c_min_peer_utilisation",
    "c_steps_lost",
    "c_vs_b_test_gap_equal_wallclock_pts",
    "c_vs_a_test_gap_equal_samples_pts",
}


def _run_dirs(work) -> list:
    if not os.path.isdir(work):
        return []
    return [d for d in (os.path.join(work, x) for x in sorted(os.listdir(work))) if os.path.isdir(d)]


def _stop_everything(proc: subprocess.Popen, work) -> None:
    """SIGTERM the bench (it stops its simulations), then SIGKILL every session it or they started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    for pid in [proc.pid] + [p for d in _run_dirs(work) for p in started_pids(d)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


@pytest.mark.acceptance  # three 4-peer simulations, about 90 s: kept out of make test's 10-minute budget
@pytest.mark.timeout(400)
def test_tiny_stragglers_bench(tmp_path):
    out, work = tmp_path / "strag.json", tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, BENCH, "--seeds", "1", "--tiny", "--work-dir", str(work), "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
        preexec_fn=sigint_default,
    )
    try:
        stdout, _ = proc.communicate(timeout=360)
        assert proc.returncode == 0, stdout[-4000:]
        for word in ("time and work in the budget", "at equal samples", "round s", "util fast", "steps lost"):
            assert word in stdout, word
        for name in TARGETS:
            assert name in stdout, name
        data = json.loads(out.read_text())
        assert [r["row"] for r in data["rows"]] == ["a", "b", "c"]
        a, b, c = data["rows"]
        assert a["speeds"] == [1.0] * 4 and b["speeds"] == c["speeds"] == [1.0, 1.0, 0.5, 0.25]
        assert (a["local_steps"], b["local_steps"], c["local_steps"]) == ("fixed", "fixed", "balanced")
        assert b["coordinator_args"] == ["adaptive_grace=false"]
        for r in data["rows"]:
            assert r["rounds_in_budget"] >= 2 and r["round_s"] > 0 and r["samples_per_s"] > 0, r
            for point in (r["wall"], r["equal_samples"]):
                for k in ("val_max", "val_min", "test_max", "test_min"):
                    assert 0 <= point[k] <= 100, (k, point)
            (seed,) = r["per_seed"]
            assert seed["parity"] is True and seed["rounds_lost"] == 0, seed
            assert set(seed["steps_lost"]) == {"p0", "p1", "p2", "p3"}
        # equal samples: every row is read at (about) the fewest samples any row committed in the budget
        s_star = min(r["per_seed"][0]["samples_in_budget"] for r in data["rows"])
        assert all(r["per_seed"][0]["equal_samples_target"] == s_star for r in data["rows"])
        # row (c) is balanced: the slow peers trained fewer steps per round than the fast ones
        spr = c["mean_steps_per_round"]
        assert (spr["p2"] + spr["p3"]) / 2 < (spr["p0"] + spr["p1"]) / 2, spr
        assert spr["p3"] < max(spr["p0"], spr["p1"]), spr
        assert a["mean_steps_per_round"] == {p: 4.0 for p in ("p0", "p1", "p2", "p3")}
        assert {t["name"] for t in data["targets"]} == TARGETS and len(data["targets"]) == len(TARGETS)
        for t in data["targets"]:
            assert set(t) == {"name", "value", "target", "met"} and isinstance(t["met"], bool)
            op, num = t["target"].split()
            want = t["value"] <= float(num) if op == "<=" else t["value"] >= float(num)
            assert t["met"] == (math.isfinite(t["value"]) and want), t
        assert not [p for d in _run_dirs(work) for p in started_pids(d) if alive(p)], "processes left behind"
    finally:
        _stop_everything(proc, work)


@pytest.mark.timeout(60)
def test_bad_arguments_are_one_argparse_line(tmp_path):
    for args, word in ((["--set", "nokey"], "'nokey'"), (["--task", "cifar"], "cifar"), (["--seeds", "0"], "0")):
        bad = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert bad.returncode == 2 and word in bad.stderr, bad.stderr
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x").write_text("")
    bad = subprocess.run(
        [sys.executable, BENCH, "--work-dir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert bad.returncode == 2 and "not empty" in bad.stderr, bad.stderr
