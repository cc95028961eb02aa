"""The README's "From training to deployment" block, run command by command (with fewer
steps and candidates appended; each console script's function called in this process),
then the exported TorchScript loaded in a process that never imports dtrain: same test
accuracy as the calibrated subnet inside the supernet."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.timeout(420)

# appended to the README's commands: the same pipeline, small enough for the test suite
FASTER = {
    "dtrain-train": [
        "steps=10",
        "batch_size=32",
        "eval_every=0",
        "threads=1",
        "logger.progress=off",
        "calib_batches=2",
    ],
    "dtrain-latency": ["repeats=2", "warmup=0", "threads=1"],
    "dtrain-search": [
        "evolution.population=4",
        "evolution.parents=2",
        "evolution.generations=2",
        "predictor.warmup=4",
        "predictor.epochs=30",
        "eval.calib_batches=2",
        "threads=1",
    ],
    "dtrain-export": ["eval.calib_batches=2", "threads=1"],
    "dtrain-report": ["dpi=40"],
}


def walkthrough_commands():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert block, "README.md lost its walkthrough block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _console_script(name: str):
    """The function a console script of this package runs (as pip installed it)."""
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name]
    return ep.load()


def test_readme_walkthrough(tmp_path, monkeypatch, capsys):
    cmds = walkthrough_commands()
    assert [c[0] for c in cmds] == [
        "dtrain-train",
        "dtrain-latency",
        "dtrain-search",
        "dtrain-export",
        "dtrain-report",
        "python",
    ]
    # each command runs in this process (what its console script calls), in the directory the README
    # assumes: the same code path without paying five interpreter and torch start-ups
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        if cmd[0] == "python":
            assert cmd[1] == "-c"
            exec(compile(cmd[2], "<README>", "exec"), {})
            continue
        code = 0
        try:
            _console_script(cmd[0])([*cmd[1:], *FASTER[cmd[0]]])
        except SystemExit as ex:
            code = ex.code
        out, err = capsys.readouterr()
        assert code in (0, None), (cmd, out[-2000:], err[-3000:])
    run = tmp_path / "runs" / "digits"
    for f in (
        "search/pareto.json",
        "search/pareto.png",
        "export/model.safetensors",
        "export/model.ts",
        "export/arch.json",
        "report/report.md",
        "report/loss.png",
        "latency.json",
    ):
        assert (run / f).stat().st_size > 0, f
    doc = json.load(open(run / "export" / "arch.json"))
    front = json.load(open(run / "search" / "pareto.json"))["pareto"]
    assert doc["arch"] == front[-1]["arch"] and doc["cost"]["macs"] <= 2_500_000

    # the export, without dtrain: the same outputs and the same test accuracy as the subnet in the
    # supernet (calibrated the way dtrain-export calibrates it)
    from dtrain.config import ExportConfig
    from dtrain.search.export import _outputs
    from dtrain.search.run import prepare
    from dtrain.train.distributed import DistContext
    from dtrain.train.evaluate import evaluate_arch

    ecfg = ExportConfig(checkpoint=str(run), out_dir=str(tmp_path / "unused"), arch="x.json")
    ecfg.eval.calib_batches = 2
    src, data, scorer = prepare(ecfg, DistContext())
    evaluate_arch(src.model, doc["arch"], data.test, scorer.calib, 512, "cpu", "classification", keep_bn=False)
    src.model.set_active(doc["arch"])
    want, y = _outputs(src.model.eval(), data.test, 512, "cpu", prepare=src.model.adapt_input)
    x = data.test.batch(torch.arange(len(data.test)))[0]
    torch.save({"x": x, "y": y}, tmp_path / "test.pt")
    script = (
        "import sys, torch\n"
        "m = torch.jit.load(sys.argv[1]); d = torch.load(sys.argv[2])\n"
        "logits = m(d['x']); torch.save(logits, sys.argv[3])\n"
        "acc = (logits.argmax(1) == d['y']).double().mean().item()\n"
        "assert not [k for k in sys.modules if k.split('.')[0] == 'dtrain'], 'dtrain was imported'\n"
        "print(repr(acc))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            script,
            str(run / "export" / "model.ts"),
            str(tmp_path / "test.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, atol=1e-5, rtol=1e-5)
    assert float(p.stdout.strip()) == doc["metrics"]["accuracy_supernet"] == doc["metrics"]["accuracy_export"]
    assert doc["metrics"]["count"] == len(y)
