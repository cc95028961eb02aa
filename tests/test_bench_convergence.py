"""bench/convergence.py runs end to end on a tiny setting and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.acceptance  # about 30 s of peer start-ups: kept out of make test's 10-minute budget
@pytest.mark.timeout(300)
def test_tiny_convergence_bench(tmp_path):
    out = tmp_path / "conv.json"
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "convergence.py"),
            "--peers",
            "2",
            "--steps",
            "4",
            "--batch",
            "8",
            "--sync-every",
            "2",
            "--seeds",
            "1",
            "--configs",
            "ddp,diloco int4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "max test %" in p.stdout and "outer.lr=1.0 outer.momentum=0.0" in p.stdout
    data = json.load(open(out))
    assert {r["config"] for r in data["rows"]} == {"ddp", "diloco int4"}
    int4 = next(r for r in data["rows"] if r["config"] == "diloco int4")
    assert "outer.momentum=0.0" in int4["outer"] and 0 <= int4["min_val_acc"] <= 100
    names = {t["name"] for t in data["targets"]}
    assert names == {"diloco_vs_ddp_gap_pts", "int8_vs_fp32_gap_pts", "int4_vs_fp32_gap_pts"}
    for t in data["targets"]:
        assert set(t) == {"name", "value", "target", "met"}
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "convergence.py"), "--configs", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "convergence.py"), "--outer-set", "lr=2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "'lr=2'" in bad.stderr
