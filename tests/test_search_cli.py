"""dtrain-search / dtrain-export / dtrain-latency on a real (tiny) trained supernet: outputs,
budgets, torchrun ranks sharing the evaluations, a dtrain-sim run dir as the source, ONNX,
and one-line errors for bad arguments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose, fast_cfg

pytestmark = pytest.mark.timeout(240)

FAST_SEARCH = [
    "evolution.population=6",
    "evolution.parents=3",
    "evolution.generations=2",
    "eval.calib_batches=2",
    "eval.calib_batch_size=16",
    "eval.batch_size=256",
    "threads=1",
    "device=cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run dir with a checkpoint of the fast mbv3 supernet after a few steps."""
    from dtrain.train.loop import train

    torch.set_num_threads(1)
    cfg = fast_cfg(tmp_path_factory.mktemp("search"), "steps=12", "eval_every=0", "threads=1", "device=cpu", name="run")
    train(cfg)
    return cfg.run_dir


def _search(run_dir, out_dir, *extra):
    from dtrain.search.run import run_search

    cfg = compose([f"checkpoint={run_dir}", f"out_dir={out_dir}", *FAST_SEARCH, *extra], config_name="search")
    return run_search(cfg)


def _cli(main, argv, capsys):
    """Run a console script's main in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_search_outputs_and_budget(trained, tmp_path):
    from dtrain.search.latency import build_table, check_table, save_table
    from dtrain.search.source import load_source
    from dtrain.supernet.latency_units import units

    src = load_source(trained)
    table = build_table(src.model, src.model_cfg, torch.device("cpu"), batch_size=1, warmup=0, repeats=1)
    check = check_table(src.model, table, torch.device("cpu"), n=3, warmup=0, repeats=1)
    assert [r["name"] for r in check] == ["largest", "smallest", "random0"]
    for r in check:  # the sum of units against the whole subnet, timed
        assert (
            r["predicted_ms"] > 0
            and r["measured_ms"] > 0
            and r["ratio"] == pytest.approx(r["predicted_ms"] / r["measured_ms"], rel=1e-3)
        )
    lat = str(tmp_path / "latency.json")
    save_table(lat, table)
    cap = src.model.cost(src.model.space.max())["macs"] // 2
    out = _search(
        trained,
        tmp_path / "s",
        f"constraints.max_macs={cap}",
        f"constraints.latency_table={lat}",
        "predictor.enabled=true",
        "predictor.warmup=4",
        "predictor.epochs=50",
        "predictor.oversample=2",
    )
    doc = json.load(open(tmp_path / "s" / "pareto.json"))
    assert doc["pareto"] == json.loads(json.dumps(out["pareto"]))
    # generation 0: 6 feasible archs + the largest (over budget, evaluated as an anchor); generation 1: 6
    assert doc["evaluated"] == 7 + 6 and doc["split"] == "val" and doc["metric"] == "accuracy"
    assert doc["largest"]["macs"] > cap  # the anchor is evaluated and shown, but not on the front
    pts = doc["pareto"]
    assert pts and all(p["macs"] <= cap and p["latency_ms"] > 0 for p in pts)
    assert [p["index"] for p in pts] == list(range(len(pts)))
    assert [p["macs"] for p in pts] == sorted(p["macs"] for p in pts)
    assert [p["accuracy"] for p in pts] == sorted(p["accuracy"] for p in pts)  # a front: more cost, more accuracy
    for p in pts:
        assert set(p) >= {"arch", "accuracy", "macs", "params", "latency_ms"}
        assert p["latency_ms"] == pytest.approx(sum(table["entries"][u] for u in units(src.model, p["arch"])))
    assert doc["predictor"]["enabled"] and doc["predictor"]["held_out"] == 6
    with open(tmp_path / "s" / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cands = [json.loads(line) for line in open(tmp_path / "s" / "candidates.jsonl")]
    assert len(cands) == 13 and {c["role"] for c in cands} >= {"largest", "smallest"}


def test_torchrun_ranks_share_the_evaluations_and_agree(trained, tmp_path):
    one = _search(trained, tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "dtrain.cli.search",
        f"checkpoint={trained}",
        f"out_dir={tmp_path / 'two'}",
        *FAST_SEARCH,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=REPO, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "pareto.json"))
    assert two["pareto"] == json.loads(json.dumps(one["pareto"]))  # the same bits from 1 or 2 ranks
    assert p.stdout.count("Pareto front") == 1  # rank 0 alone prints and writes


def _fake_sim(trained, root, rounds):
    """A dtrain-sim-shaped run dir: the coordinator's state and peers holding DiLoCo states."""
    from dtrain.outer.flat_params import FlatLayout
    from dtrain.outer.global_state import GlobalState

    ckpt = torch.load(os.path.join(trained, "checkpoints", "latest.pt"), weights_only=True)
    from dtrain.search.source import load_source

    model = load_source(trained).model
    theta = FlatLayout(model).flatten(model)
    history, committed = [], max(r for r, _ in rounds.values()) - 1
    for peer, (rnd, scale) in rounds.items():
        state = dict(ckpt)
        state["outer"] = {"round": rnd, "tensors": {"theta": theta * scale, "velocity": torch.zeros_like(theta)}}
        d = root / f"peer-{peer}" / "checkpoints"
        d.mkdir(parents=True)
        torch.save(state, d / "latest.pt")
        shutil.copy(os.path.join(trained, "config.json"), root / f"peer-{peer}" / "config.json")
        h = GlobalState([("theta", theta * scale), ("velocity", torch.zeros_like(theta))], round=rnd).hash()
        history.append({"round": rnd, "state_hash": h})
    (root / "coordinator").mkdir()
    return history, committed


def test_sim_run_dir_gives_the_coordinator_confirmed_latest(trained, tmp_path):
    from dtrain.config import ConfigError
    from dtrain.search.source import resolve_checkpoint

    root = tmp_path / "sim"
    # a and b hold S_5 (produced by round 4, the 5th commit); c lags at S_4; d claims S_4 with other bits.
    # The coordinator's committed_round counts commits; its history holds the hash of S_r per round r.
    history, _ = _fake_sim(trained, root, {"a": (5, 1.0), "b": (5, 1.0), "c": (4, 0.5), "d": (4, 0.25)})
    c_hash = next(h for h in history if h["round"] == 4)["state_hash"]
    (root / "coordinator" / "state.json").write_text(
        json.dumps(
            {"committed_round": 5, "history": [{"round": 4, "state_hash": c_hash, "members": ["c"], "quorum_id": 3}]}
        )
    )
    path, info = resolve_checkpoint(str(root))
    assert info["peer"] == "a" and info["round"] == 5 and info["peers_agreeing"] == 2
    assert "committed round 4" in info["confirmed"]
    # with 4 commits, S_5 is not confirmed: S_4 of c is (d's bits differ from the recorded hash)
    (root / "coordinator" / "state.json").write_text(
        json.dumps({"committed_round": 4, "history": [{"round": 4, "state_hash": c_hash}]})
    )
    path, info = resolve_checkpoint(str(root))
    assert info["peer"] == "c" and info["round"] == 4 and "history" in info["confirmed"]
    out = _search(str(root), tmp_path / "s")  # and the search runs on it, with the peers' config.json
    assert out["source"]["peer"] == "c" and out["source"]["weights"] == "global (DiLoCo)"
    (root / "coordinator" / "state.json").write_text(json.dumps({"committed_round": 1, "history": []}))
    with pytest.raises(ConfigError, match="no peer checkpoint is confirmed"):
        resolve_checkpoint(str(root))


def test_export_weights_torchscript_and_onnx(trained, tmp_path):
    from dtrain.search.export import run_export

    arch_file = tmp_path / "arch.json"
    from dtrain.search.source import load_source

    space = load_source(trained).model.space
    arch_file.write_text(json.dumps({"arch": space.min()}))
    cfg = compose(
        [
            f"checkpoint={trained}",
            f"out_dir={tmp_path / 'e'}",
            f"arch={arch_file}",
            "weights=torch",
            "eval.calib_batches=2",
            "eval.calib_batch_size=16",
            "threads=1",
            "device=cpu",
        ],
        config_name="export",
    )
    doc = run_export(cfg)
    m = doc["metrics"]
    assert m["accuracy_export"] == m["accuracy_supernet"] and m["max_abs_logit_diff"] < 1e-4
    assert doc["arch"] == space.min() and doc["cost"] == load_source(trained).model.cost(space.min())
    ts = torch.jit.load(str(tmp_path / "e" / "model.ts"))
    weights = torch.load(tmp_path / "e" / "model.pt", weights_only=True)
    assert set(weights) == set(ts.state_dict())
    for k, v in weights.items():
        assert torch.equal(v, ts.state_dict()[k].contiguous()), k
    try:
        import onnx
    except ImportError:
        return  # the onnx extra is not installed: test_bad_arguments checks onnx=on says so
    from onnx.reference import ReferenceEvaluator

    assert "model.onnx" in doc["files"]
    model = onnx.load(str(tmp_path / "e" / "model.onnx"))
    onnx.checker.check_model(model)
    x = torch.randn(3, 1, 8, 8)
    got = ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ts(x), atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_one_line(trained, tmp_path, capsys):
    from dtrain.cli import export, latency, search

    base = [f"out_dir={tmp_path / 'o'}", *FAST_SEARCH]
    cases = [
        (search.main, ["checkpoint=/nonexistent/run", *base], "checkpoint='/nonexistent/run' does not exist"),
        (
            search.main,
            [f"checkpoint={trained}", *base, "constraints.max_macs=10"],
            "constraints.max_macs=10 is not allowed: the smallest subnet already has macs=",
        ),
        (search.main, [f"checkpoint={trained}", *base, "evolution.parents=0"], "evolution.parents=0 is not allowed"),
        (search.main, [f"checkpoint={trained}", *base, "constraints.max_latency_ms=1"], "constraints.latency_table"),
        (latency.main, ["out=x.json", "batch_size=0"], "batch_size=0 is not allowed"),
    ]
    bad_latency = tmp_path / "lat.json"
    bad_latency.write_text(json.dumps({"version": 1, "model_config_hash": "other", "entries": {}}))
    cases.append(
        (
            search.main,
            [f"checkpoint={trained}", *base, f"constraints.latency_table={bad_latency}"],
            "was built for another model config",
        )
    )
    pareto = tmp_path / "pareto.json"
    pareto.write_text(json.dumps({"pareto": [{"arch": {}}]}))
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"arch": {"resolution": 99, "depth": [1, 1], "kernel": [3] * 4, "expand": [2] * 4}}))
    exp = [f"checkpoint={trained}", f"out_dir={tmp_path / 'e'}", "threads=1", "device=cpu"]
    cases += [
        (export.main, [*exp, f"pareto={pareto}", "index=4"], "index=4 is not allowed: "),
        (export.main, [*exp, f"arch={arch}"], "arch resolution=99 is not allowed: choose one of 8, 12"),
        (export.main, [*exp], "give exactly one of arch=FILE.json or pareto=pareto.json index=K"),
        (export.main, [*exp, f"arch={tmp_path / 'missing.json'}"], "cannot be read"),
    ]
    try:
        import onnx  # noqa: F401
    except ImportError:
        good = tmp_path / "good.json"
        good.write_text(json.dumps({"resolution": 8, "depth": [1, 1], "kernel": [3] * 4, "expand": [2] * 4}))
        cases.append((export.main, [*exp, f"arch={good}", "onnx=on"], "onnx=on is not allowed"))
    for main, argv, expected in cases:
        code, out, err = _cli(main, argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, out[-500:], err[-2000:])
        assert len(lines) == 1 and expected in lines[0], (argv, err)
