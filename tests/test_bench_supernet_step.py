"""Smoke test of ``bench/supernet_step.py``: a tiny run as a subprocess prints its
table and writes the ``--json`` report with the three named targets; bad
arguments fail with one argparse line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "supernet_step.py"
TARGETS = {"supernet_vs_static", "supernet_vs_ofa", "sandwich_vs_sum"}


def _run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.acceptance  # builds the full-size ofa network: kept out of make test's 10-minute budget
@pytest.mark.timeout(300)
def test_tiny_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = _run("--resolution", "16", "--batch", "2", "--repeats", "2", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for word in ("a_supernet", "b_static", "d_sandwich", "median s/step", *TARGETS):
        assert word in proc.stdout

    report = json.loads(out.read_text())
    assert set(report) >= {"rows", "targets"}
    rows = {r["variant"]: r for r in report["rows"]}
    for key in ("a_supernet", "b_static", "d_sandwich", "d_sum_of_singles"):
        assert math.isfinite(rows[key]["median_s"]) and rows[key]["median_s"] > 0

    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == TARGETS and len(report["targets"]) == 3
    for t in report["targets"]:
        assert isinstance(t["name"], str) and isinstance(t["target"], str)
        assert isinstance(t["value"], float) and isinstance(t["met"], bool)
        limit = float(t["target"].split()[-1])
        assert t["target"].startswith("<= ")
        assert t["met"] == (math.isfinite(t["value"]) and t["value"] <= limit)
    assert math.isfinite(targets["supernet_vs_static"]["value"])
    assert math.isfinite(targets["sandwich_vs_sum"]["value"])

    ofa_value = targets["supernet_vs_ofa"]["value"]
    if importlib.util.find_spec("ofa") is not None:
        assert math.isfinite(ofa_value), report.get("notes")
        assert {"c_ofa_nchw", "c_ofa_cl"} <= set(rows)
    elif math.isnan(ofa_value):
        assert not targets["supernet_vs_ofa"]["met"]
        assert "ofa could not run" in proc.stdout


@pytest.mark.timeout(300)
def test_bad_argument_is_one_argparse_line():
    proc = _run("--batch", "0", timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--batch" in errors[0]
