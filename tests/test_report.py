"""dtrain-report: figures and report.md of a real single-peer run and of a dtrain-sim run dir, bad arguments,
torn and corrupt JSON lines, the report's images in an offline wandb run."""

from __future__ import annotations

import copy
import glob
import json
import os
import sys

import pytest
import torch

from dtrain.config import ConfigError
from dtrain.obs import run_series
from dtrain.obs.report import write_report
from dtrain.obs.run_reader import load_run, read_jsonl

from conftest import fast_cfg

pytestmark = pytest.mark.timeout(120)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ["loss.png", "accuracy.png", "membership.png", "bytes.png", "round_time.png"]
DPI = 40  # small figures: the test is about files and numbers, not looks


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, path
    assert os.path.getsize(path) > 1000, path


def _write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------- a real single-peer run (wandb offline)
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """8 steps of the tiny supernet with logger=wandb (offline): its metrics.jsonl, summary.json, wandb dir."""
    from dtrain.train.loop import train

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = "offline"
    cfg = fast_cfg(
        tmp_path_factory.mktemp("report"),
        "steps=8",
        "eval_every=4",
        "log_every=2",
        "threads=1",
        "logger=wandb",
        "logger.wandb.mode=offline",
        name="single",
    )
    train(cfg)
    return cfg.run_dir


def test_single_run_report(single_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bytes.png").write_bytes(PNG_MAGIC + b"stale")  # an earlier report's figure the run cannot back
    files = write_report(single_run, str(out), dpi=DPI)
    assert [os.path.basename(f) for f in files] == ["loss.png", "accuracy.png", "report.md"]
    for f in files[:-1]:
        _assert_png(f)
    assert not (out / "bytes.png").exists()
    md = (out / "report.md").read_text()
    summary = json.load(open(os.path.join(single_run, "summary.json")))
    res = summary["results"]
    assert "| steps | 8 |" in md
    max_acc, min_acc = res["max"]["test_acc"], res["min"]["test_acc"]
    assert f"| final test accuracy (max / min) | {100 * max_acc:.2f}% / {100 * min_acc:.2f}% |" in md
    assert "![Loss of the largest, smallest and random subnets](loss.png)" in md
    assert "![Accuracy](accuracy.png)" in md
    for title in ("Membership and chaos events", "Bytes per round", "Round time"):
        section = md.split(f"## {title}")[1].split("##")[0]
        assert "_Not plotted: no" in section and ".png" not in section
    # three subnets of the sandwich, every logged step, on the step axis
    loss = run_series.loss_series(load_run(single_run))
    (groups,) = loss.values()
    assert set(groups) == {"max", "min", "random"} and [s for s, _ in groups["max"]] == [2, 4, 6, 8]
    metric, axis, evals = run_series.eval_series(load_run(single_run))
    assert (metric, axis) == ("acc", "step")
    assert [x for x, _ in evals[("peer0", "val", "max")]] == [4, 8]


def test_wandb_offline_run_gets_the_report_images(single_run):
    runs = glob.glob(os.path.join(single_run, "wandb", "offline-run-*"))
    assert len(runs) == 1, os.listdir(os.path.join(single_run, "wandb"))
    images = sorted(
        os.path.basename(p).split("_")[0]
        for p in glob.glob(os.path.join(runs[0], "files", "media", "images", "report", "*.png"))
    )
    assert images == ["accuracy", "loss"]
    for p in glob.glob(os.path.join(runs[0], "files", "media", "images", "report", "*.png")):
        _assert_png(p)


# --------------------------------------------------------------------------- a dtrain-sim run dir
T0 = 1_800_000_000.0
H = 10  # inner steps per round
HASH = ["%064x" % (i + 1) for i in range(4)]  # HASH[r]: the state hash of S_r


def _loss(step):
    return {"max": 2.3 - 0.05 * step, "min": 0.01 * step, "rand0": 0.02 * step, "rand1": 0.04 * step}


def _round(r, step, t, members, compute, comm, wait, sent):
    # the fields of OuterLoop._record_round (dtrain/peer/outer_loop.py)
    return {
        "kind": "round",
        "round": r,
        "quorum_id": r + 1,
        "quorum_size": len(members),
        "members": members,
        "state_hash": HASH[r + 1],
        "bytes_sent": sent,
        "bytes_recv": sent,
        "round_s": compute + comm + wait + 0.5,
        "compute_s": compute,
        "comm_s": comm,
        "wait_s": wait,
        "codec": "fp32",
        "attempts": 1,
        "step": step,
        "time": T0 + t,
    }


@pytest.fixture(scope="module")
def sim_dir(single_run, tmp_path_factory):
    """A dtrain-sim run dir: p0 runs throughout, p1 is SIGKILLed after round 0, p2 joins and heals to S_2.

    Step, eval, run and summary records are copied from the real single-peer run (steps and times changed);
    round and heal records carry the fields OuterLoop writes; summary.json comes from dtrain.sim.summary."""
    from dtrain.sim.summary import summarize

    d = str(tmp_path_factory.mktemp("sim") / "sim")
    real = list(read_jsonl(os.path.join(single_run, "metrics.jsonl")))
    step_t = next(r for r in real if r["kind"] == "step")
    evals_t = [r for r in real if r["kind"] == "eval" and r["step"] == 8]
    start_t = next(r for r in real if r["kind"] == "run")
    config = json.load(open(os.path.join(single_run, "config.json")))
    peer_summary = json.load(open(os.path.join(single_run, "summary.json")))

    def step(s, t):
        return {**step_t, "step": s, "loss": _loss(s), "time": T0 + t}

    def evals(s, t):
        return [{**e, "step": s, "time": T0 + t} for e in evals_t]

    def start(peer, t, s=0):
        return {**start_t, "peer_id": peer, "step": s, "time": T0 + t}

    peers = {
        "p0": [
            start("p0", 2),
            step(5, 6),
            step(10, 9),
            _round(0, 10, 10, ["p0", "p1"], 7.0, 1.0, 0.5, 4_000_000),
            step(15, 13),
            step(20, 16),
            _round(1, 20, 17, ["p0"], 5.0, 0.1, 1.5, 0),
            step(25, 21),
            step(30, 24),
            _round(2, 30, 25, ["p0", "p2"], 6.0, 1.0, 2.0, 4_000_000),
            *evals(30, 26),
        ],
        "p1": [start("p1", 2), step(5, 6), step(10, 9), _round(0, 10, 10, ["p0", "p1"], 7.5, 1.0, 0.0, 4_000_000)],
        "p2": [
            start("p2", 15),
            {
                "kind": "heal",
                "round": 2,
                "donor": "p0",
                "bytes": 3_000_000,
                "seconds": 0.4,
                "state_hash": HASH[2],
                "reason": "joined behind",
                "time": T0 + 19,
            },
            step(25, 22),
            step(30, 24.5),
            _round(2, 30, 25, ["p0", "p2"], 4.0, 1.0, 0.0, 4_000_000),
            *evals(30, 26),
        ],
    }
    for peer, recs in peers.items():
        _write_jsonl(os.path.join(d, f"peer-{peer}", "metrics.jsonl"), recs)
        cfg = copy.deepcopy(config)
        cfg["peer_id"] = peer
        cfg["outer"].update(name="diloco", sync_every=H)
        json.dump(cfg, open(os.path.join(d, f"peer-{peer}", "config.json"), "w"))
        if peer != "p1":
            json.dump(peer_summary, open(os.path.join(d, f"peer-{peer}", "summary.json"), "w"))
    # dtrain/sim/cluster.py Simulation.event
    ev = [
        ("sim_start", 0.0, {"peers": 2, "rounds": 3, "resume": False, "peer_kind": "train", "wan": True}),
        ("coordinator_start", 1.0, {"pid": 101, "address": "127.0.0.1:40000"}),
        ("peer_start", 1.1, {"peer": "p0", "pid": 102, "reason": "start", "region": "eu", "nproc": 1, "port": 40001}),
        ("peer_start", 1.2, {"peer": "p1", "pid": 103, "reason": "start", "region": "us", "nproc": 1, "port": 40002}),
        ("chaos_clock_start", 10.5, {"committed_round": 1, "actions": 2}),
        ("kill", 12.0, {"peer": "p1", "signal": "KILL", "committed_round": 1}),
        ("peer_exit", 12.1, {"peer": "p1", "status": -9}),
        (
            "peer_start",
            14.0,
            {"peer": "p2", "pid": 104, "reason": "chaos join", "region": "eu", "nproc": 1, "port": 40003},
        ),
        ("peer_exit", 28.0, {"peer": "p0", "status": 0}),
        ("peer_exit", 28.1, {"peer": "p2", "status": 0}),
        ("sim_end", 28.5, {"status": "ok", "error": "", "committed_round": 3}),
    ]
    _write_jsonl(os.path.join(d, "events.jsonl"), [{"t": t, "time": T0 + t, "event": k, **f} for k, t, f in ev])
    # dtrain/control/service.py's log: membership changes, quorums and commits
    commits = [(0, 10.0, ["p0", "p1"]), (1, 17.0, ["p0"]), (2, 25.0, ["p0", "p2"])]
    clog = [
        {
            "time": T0 + 3,
            "event": "join",
            "peer_id": "p0",
            "address": "127.0.0.1:40001",
            "region": "eu",
            "world_size": 1,
            "round": 0,
        },
        {
            "time": T0 + 3.1,
            "event": "join",
            "peer_id": "p1",
            "address": "127.0.0.1:40002",
            "region": "us",
            "world_size": 1,
            "round": 0,
        },
        {"time": T0 + 14.5, "event": "expire", "peer_id": "p1", "reason": "lease expired (3s without a call)"},
        {
            "time": T0 + 15.0,
            "event": "join",
            "peer_id": "p2",
            "address": "127.0.0.1:40003",
            "region": "eu",
            "world_size": 1,
            "round": 0,
        },
        {"time": T0 + 27.0, "event": "leave", "peer_id": "p0", "reason": "finished"},
        {"time": T0 + 27.1, "event": "leave", "peer_id": "p2", "reason": "finished"},
    ]
    clog += [
        {"time": T0 + t, "event": "commit", "round": r, "quorum_id": r + 1, "members": m, "state_hash": HASH[r]}
        for r, t, m in commits
    ]
    _write_jsonl(os.path.join(d, "coordinator", "events.jsonl"), sorted(clog, key=lambda e: e["time"]))
    history = [
        {"members": m, "quorum_id": r + 1, "round": r, "state_hash": HASH[r], "time": T0 + t} for r, t, m in commits
    ]
    json.dump({"committed_round": 3, "history": history}, open(os.path.join(d, "coordinator", "state.json"), "w"))
    json.dump(summarize(d, 3), open(os.path.join(d, "summary.json"), "w"), indent=2)
    return d


def test_sim_series(sim_dir):
    run = load_run(sim_dir)
    assert run.kind == "sim" and sorted(run.peers) == ["p0", "p1", "p2"]
    metric, axis, evals = run_series.eval_series(run)
    assert axis == "round" and [x for x, _ in evals[("p0", "test", "max")]] == [3.0]
    m = run_series.membership(run)
    assert [n for _, n in m["live"]] == [0, 1, 2, 1, 2, 1, 0]
    assert [n for _, n in m["members"]] == [1, 2, 1, 2, 1, 0]
    assert [n for _, n in m["quorum"]] == [2, 1, 2]
    assert [(round(t, 1), k, label) for t, k, label in m["events"]] == [
        (12.0, "kill", "kill p1 (KILL)"),
        (14.0, "join", "join p2"),
    ]
    outer, heals = run_series.bytes_per_round(run)
    assert outer["p0"] == {0: 8_000_000, 1: 0, 2: 8_000_000} and heals == {2: 3_000_000}
    split = {r[0]: r[1:] for r in run_series.round_time_split(run)}
    assert split[0] == pytest.approx((7.25, 1.0, 0.25, 0.5)) and split[1] == pytest.approx((5.0, 0.1, 1.5, 0.5))


def test_replayed_steps_keep_the_last_record(tmp_path):
    """A peer restarted from an older checkpoint logs some steps twice: the later record wins."""
    recs = [
        {"kind": "step", "step": s, "loss": {"max": v}, "time": T0 + i}
        for i, (s, v) in enumerate([(5, 2.0), (10, 1.5), (5, 1.9), (10, 1.4), (15, 1.2)])
    ]
    _write_jsonl(str(tmp_path / "metrics.jsonl"), recs)
    (groups,) = run_series.loss_series(load_run(str(tmp_path))).values()
    assert groups == {"max": [(5, 1.9), (10, 1.4), (15, 1.2)]}


def test_cli_writes_the_sim_report_and_nothing_in_cwd(sim_dir, tmp_path, capsys, monkeypatch):
    """dtrain-report run_dir=<a dtrain-sim run>: every figure, report.md with the numbers, the files printed."""
    from dtrain.cli.report import main

    summary = json.load(open(os.path.join(sim_dir, "summary.json")))
    assert summary["parity"] and summary["rounds_lost"] == 0 and summary["faults_injected"] == 1  # a sound fixture
    monkeypatch.setattr(sys, "argv", ["dtrain-report"])
    monkeypatch.chdir(tmp_path)
    main([f"run_dir={sim_dir}", f"out_dir={tmp_path / 'r'}", f"dpi={DPI}"])  # returns: exit status 0
    files = capsys.readouterr().out.split()
    assert files == [str(tmp_path / "r" / n) for n in ALL_PLOTS + ["report.md"]]
    assert os.listdir(tmp_path) == ["r"]
    for f in files[:-1]:
        _assert_png(f)
    md = open(files[-1]).read()
    for name in ALL_PLOTS:
        assert f"]({name})" in md
    assert "Not plotted" not in md
    acc = summary["final_accuracy"]
    compute = 7.0 + 5.0 + 6.0 + 7.5 + 4.0
    total = compute + (1.0 + 0.5 + 0.5) + (0.1 + 1.5 + 0.5) + (1.0 + 2.0 + 0.5) + (1.0 + 0.5) + (1.0 + 0.5)
    for row in (
        "| run | dtrain-sim, 3 peer(s) over the run |",
        "| steps | 30 |",
        "| rounds committed | 3 of 3 |",
        f"| final test accuracy (max / min) | {100 * acc['max']:.2f}% / {100 * acc['min']:.2f}% |",
        "| faults injected | 1 (kill_kill: 1) |",
        "| recoveries | 1 (1 heals, 0 round retries) |",
        "| parity | ok (3 rounds checked) |",
        "| rounds lost | 0 |",
        "| bytes moved | 19.00MB (outer 16.00MB, state transfer 3.00MB) |",
        f"| mean compute utilisation | {100 * compute / total:.1f}% |",
    ):
        assert row in md, (row, md)


def test_a_single_diloco_peer_gets_its_rounds(tmp_path):
    """No simulation around it: membership comes from the quorum of its round records."""
    recs = [_round(0, 10, 10, ["a", "b"], 7.0, 1.0, 0.5, 1000), _round(1, 20, 20, ["a"], 6.0, 0.0, 0.0, 0)]
    _write_jsonl(
        str(tmp_path / "metrics.jsonl"),
        [{"kind": "run", "event": "start", "step": 0, "peer_id": "a", "time": T0}, *recs],
    )
    run = load_run(str(tmp_path))
    assert run.kind == "single" and list(run.peers) == ["a"]
    m = run_series.membership(run)
    assert m["quorum"] == [(10.0, 2), (20.0, 1)] and m["live"] == [] and m["events"] == []
    assert ("rounds committed", "2") in run_series.summary_rows(run)


def test_lm_runs_report_bits_per_byte(tmp_path):
    evals = [
        {
            "kind": "eval",
            "step": s,
            "split": "val",
            "arch_name": a,
            "acc": 0.3,
            "loss": 2.0,
            "bpb": b,
            "params": 1,
            "macs": 1,
            "time": T0 + s,
        }
        for s, a, b in [(5, "max", 3.1), (5, "min", 3.4), (10, "max", 2.6), (10, "min", 2.9)]
    ]
    _write_jsonl(str(tmp_path / "metrics.jsonl"), [{"kind": "step", "step": 5, "loss": {"max": 2.0}}, *evals])
    run = load_run(str(tmp_path))
    metric, axis, series = run_series.eval_series(run)
    assert (metric, axis) == ("bpb", "step") and series[("peer", "val", "min")] == [(5, 3.4), (10, 2.9)]
    assert ("final val bits per byte (max / min)", "2.600 bpb / 2.900 bpb") in run_series.summary_rows(run)


# --------------------------------------------------------------------------- torn and corrupt lines
def test_torn_lines_of_a_crashed_writer_are_skipped(tmp_path):
    good = [{"kind": "step", "step": 1, "loss": {"max": 2.0}}, {"kind": "step", "step": 2, "loss": {"max": 1.8}}]
    text = json.dumps(good[0]) + "\n" + '{"kind": "step", "st' + json.dumps(good[1]) + "\n" + '{"kind": "ev'
    (tmp_path / "metrics.jsonl").write_text(text)
    run = load_run(str(tmp_path))
    assert [r["step"] for r in run.peers["peer"].records] == [1, 2]
    assert len(run.torn_lines) == 2 and run.torn_lines[1].endswith("metrics.jsonl:3")
    assert ("torn lines skipped", "2") in run_series.summary_rows(run)


def test_a_corrupt_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "peer-p0" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"kind": "run"}\nthis is not json\n{"kind": "step", "step": 1}\n')
    with pytest.raises(ConfigError, match=r"peer-p0/metrics.jsonl line 2 is not a JSON object"):
        load_run(str(tmp_path))


# --------------------------------------------------------------------------- the command line
def test_bad_run_dirs_are_one_line_errors(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "sim" / "peer-p0").mkdir(parents=True)
    (tmp_path / "sim" / "events.jsonl").write_text('{"t": 0.0, "time": 1.0, "event": "sim_start"}\n')
    for bad, want in [
        ("", "run_dir is empty"),
        (tmp_path / "nope", f"run_dir='{tmp_path / 'nope'}' does not exist"),
        (tmp_path / "a.json", f"run_dir='{tmp_path / 'a.json'}' is a file, not a directory"),
        (tmp_path / "empty", f"run_dir='{tmp_path / 'empty'}' holds no metrics.jsonl"),
        (tmp_path / "sim", "is a dtrain-sim run without any peer-*/metrics.jsonl"),
    ]:
        with pytest.raises(ConfigError) as ex:
            load_run(str(bad))
        assert want in str(ex.value) and "\n" not in str(ex.value)


@pytest.mark.parametrize("case", ["unset", "missing", "corrupt", "dpi"])
def test_cli_bad_arguments(case, tmp_path, capsys, monkeypatch):
    from dtrain.cli.report import main

    monkeypatch.setattr(sys, "argv", ["dtrain-report"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"kind": "run"}\n[1, 2\n{"kind": "step"}\n')
    argv, want = {
        "unset": ([], "run_dir is not set"),
        "missing": ([f"run_dir={tmp_path / 'nope'}"], f"run_dir='{tmp_path / 'nope'}' does not exist"),
        "corrupt": ([f"run_dir={tmp_path / 'bad'}"], f"{tmp_path / 'bad' / 'metrics.jsonl'} line 2 is not a JSON"),
        "dpi": ([f"run_dir={tmp_path / 'bad'}", "dpi=5"], "dpi=5 is not allowed"),
    }[case]
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain-report: error: ") and want in err[0], err
    assert os.listdir(tmp_path) == ["bad"]  # no report dir, no .hydra, no log
