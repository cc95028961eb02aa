"""Smoke test of bench/quality.py: ``--quick`` trains every variant for a few steps and
writes the table and the JSON report (the real numbers come from a full run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(60)
def test_quality_quick_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "quality.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "quality.py"),
            "--quick",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=55,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for header in ("arch", "MACs", "supernet %", "standalone %", "gap pts", "no-distill %", "delayed %"):
        assert header in text
    assert "max |diff| 0.00 pts" in text  # extracted static nets score what the supernet scored

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["arch"] for r in rows] == ["min", "max"]
    assert rows[0]["macs"] < rows[1]["macs"]
    for r in rows:
        for key in ("supernet_test_acc", "standalone_test_acc", "no_distill_test_acc", "delayed_test_acc"):
            assert 0.0 <= r[key] <= 100.0
        assert r["gap_pts"] == pytest.approx(r["standalone_test_acc"] - r["supernet_test_acc"])
    targets = report["targets"]
    assert [t["name"] for t in targets] == ["gap_min_pts", "gap_max_pts", "max_gap_all2_pts"]
    for t in targets:
        assert set(t) == {"name", "value", "target", "met"}
        assert t["target"] == "<= 1.0"
        assert t["met"] == (t["value"] <= 1.0)
    assert sorted(r["name"] for r in report["runs"]) == [
        "delayed",
        "no-distill",
        "standalone max",
        "standalone min",
        "supernet",
    ]
    assert os.path.isfile(tmp_path / "runs" / "supernet_s0" / "summary.json")
