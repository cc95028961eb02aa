"""Peers of different speeds: fixed against balanced local steps, at equal wall-clock and at equal samples.

Four peers, the same data, model and wall-clock budget for every row (digits
and ``mbv3_tiny`` by default; the text corpus and ``gpt_tiny`` with ``--task
text``), each row a ``dtrain-sim`` run on this machine (one per row and seed,
run one after the other: seed 0 rows a, b, c, then seed 1, ... so that machine
noise spreads over the rows). Rows:

- ``(a)``: ``sim.speed=[1,1,1,1]``, ``outer.local_steps=fixed``: the
  homogeneous reference (the coordinator as shipped: adaptive grace);
- ``(b)``: ``sim.speed=[1,1,0.5,0.25]``, ``outer.local_steps=fixed``, the
  coordinator with the grace settings from before balanced rounds
  (``adaptive_grace=false``: a quorum forms ``grace_s`` = 1 s after a
  round's first sync with the members present, whoever is late heals);
- ``(c)``: the same speeds, ``outer.local_steps=balanced`` (coordinator as
  shipped).

The slow peers are an emulation: ``sim.speed`` makes each of their inner
steps last 1/speed of its natural time (the peer sleeps the difference), so
on this machine a slow peer also leaves CPU time to the others; the four
peers share its cores (``threads=1`` each). No kills, no joins
(``chaos.kill_at_s=[] chaos.join_at_s=[]``); the WAN emulator runs with
``dtrain-sim``'s defaults (two regions, 80 ms and 100 Mbit/s between them).
Every row uses the outer optimizer the convergence bench chose on val for
short runs (``outer.lr=1.0 outer.momentum=0.0``; Nesterov 0.7 / 0.9 is
unstable over a few dozen rounds, see README "Choosing the outer
optimizer"), and an inner learning-rate schedule stretched over
``--rounds`` x H steps (default 1000 x H), far more than any row trains in
the budget: the learning rate is flat over the budget, so no row gains or
loses by where its schedule stands when it is read.

How each run is measured:

- The **wall-clock budget** B (``--budget-s``) starts at the simulation's
  ``sim_start`` event (process start-up is inside it, alike for every row);
  ``sim.duration_s=B`` then stops every peer (SIGTERM). The rounds **in the
  budget** are those the coordinator committed (its ``commit`` events) at
  most B seconds after ``sim_start``; K of them leave the global state S_K.
- **Global states** are read from the peers' own checkpoints (a peer that
  SIGTERM stops skips the trainer's final evaluation, so a time-stopped
  ``dtrain-sim`` run has no ``final_accuracy``): every peer
  writes ``checkpoints/latest.pt`` after every committed round
  (``outer.checkpoint_every_rounds=1``), and the bench hard-links each new
  version of p0's and p1's file as it appears (polled every 50 ms; a link
  keeps the replaced version), so it holds S_r for every round r. The
  global parameters (``outer.tensors.theta``) are evaluated, as
  ``dtrain-search`` loads them (:func:`dtrain.search.source.load_source`),
  with the trainer's own final evaluation: BN recalibrated on the run's
  calibration set (``calib_batches``, seeded by the run's seed) for the
  largest and the smallest subnet, val and test splits (for ``--task
  text`` the accuracy is next-token accuracy).
- **Accuracy at equal wall-clock**: of S_K, the last state committed in
  the budget.
- **Samples** of a round: the sum over the committed quorum's members of the
  inner steps each trained into it (the coordinator's ``quorum`` event that
  the ``commit`` names: ``steps``, i.e. ``local_steps`` of the round
  records; 0 for a member that sat out) x ``batch_size``. Steps a heal
  replaced are not in any round. ``samples/s`` is the samples of the rounds
  in the budget over B.
- **Accuracy at equal samples**: per seed, S* is the fewest samples any row
  committed in the budget (normally (b)'s); each row is read at the state
  S_k (k <= K) whose cumulated samples are nearest S* (the samples it
  actually had are in the table; rounds are whole, so rows differ by up to
  half a round's samples).
- **Mean round wall time**: the time between the first and the last commit
  in the budget over the rounds between them (round 0, with the start-up,
  is left out).
- **Compute utilisation**, **steps per round** and **steps lost** per peer:
  ``dtrain-sim``'s summary definitions (``dtrain/sim/summary.py``; the bench
  calls the same ``dtrain.obs.run_series.peer_work`` for every peer, also one
  that never completed a round, which the summary leaves out): utilisation is
  the ``compute_s`` of a peer's round records after its first over the wall
  time from its first round record to its last (null for a peer with fewer
  than two round records, shown n/a); steps lost are the probe steps of
  rounds it sat out plus the steps a heal replaced. The steps a peer trained
  after its last round when the budget stopped the run (the summary's
  ``steps_lost_after_last_round``) are an artefact of stopping on time,
  alike in every row, and are reported apart (``steps_cut_by_stop``), not as
  lost. Steps applied: the sum of its ``steps_per_round``. Columns ``util
  fast``: the mean of p0 and p1 (speed 1 in every row); ``util all``: the
  mean of the four; ``util min``: the lowest peer.

Targets (the worst seed of each is reported): (c) mean round time <= 1.15 x
(a)'s; (c) compute utilisation of every peer >= 0.90, or, where (a)'s own
utilisation (mean over its peers) is below 0.93 on this machine, no more than
0.03 below (a)'s; steps lost in (c) = 0; (c) test accuracy at equal
wall-clock >= (b)'s and at equal samples at most 0.5 points below (a)'s
(accuracy gaps are taken on the worse of the largest and the smallest
subnet: gap = max(ref.max - c.max, ref.min - c.min)). On a shared machine
timings and utilisation are noisy; misses are reported, never hidden. The
exit status is 0 whatever the targets (2 for bad arguments, 1 when a run
could not be read).

    python bench/stragglers.py [--task digits|text] [--seeds 3] [--budget-s 180] [--sync-every 20]
                               [--batch 32] [--rounds 1000] [--set KEY=VALUE ...] [--tiny]
                               [--work-dir DIR] [--json PATH]

With the defaults a seed is three runs of about 190 s (the budget, then the
peers' stop and the evaluations): about 29 minutes for 3 seeds on 2 cores.
``--tiny`` (the test's setting): a small model, H = 4, batch 16, a 20 s
budget, about 90 s for one seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from _common import format_table, positive_float, positive_int, target, write_json  # noqa: E402

PEERS = ["p0", "p1", "p2", "p3"]
FAST = ["p0", "p1"]
SLOW_SPEEDS = [1.0, 1.0, 0.5, 0.25]
ROWS = [  # key, label, speeds, outer.local_steps, coordinator overrides
    ("a", "(a) speeds 1,1,1,1 fixed", [1.0, 1.0, 1.0, 1.0], "fixed", []),
    ("b", "(b) speeds 1,1,.5,.25 fixed, fixed grace", SLOW_SPEEDS, "fixed", ["adaptive_grace=false"]),
    ("c", "(c) speeds 1,1,.5,.25 balanced", SLOW_SPEEDS, "balanced", []),
]
OUTER_SET = ["outer.lr=1.0", "outer.momentum=0.0"]  # bench/convergence.py's choice for short runs (on val)
TASKS = {
    "digits": ["model=mbv3_tiny", "data=digits"],
    "text": ["+experiment=gpt_text"],
}
TINY_MODEL = {  # tests/conftest.py's FAST_MBV3: a small, fast mbv3 space
    "digits": [
        "model.stem_channels=8",
        "model.stages=[{channels:8,stride:1,act:relu,se:false},{channels:16,stride:2,act:hswish,se:true}]",
        "model.final_expand=2",
        "model.feature_dim=32",
        "model.depths=[1,2]",
        "model.kernel_sizes=[3,5]",
        "model.expand_ratios=[2,3]",
        "model.resolutions=[8,12]",
    ],
    "text": [],
}
POLL_S = 0.05
NAN = float("nan")


# ---------------------------------------------------------------- one run


def peer_args(a, row_policy: str, seed: int) -> List[str]:
    args = [
        *TASKS[a.task],
        f"seed={seed}",
        f"batch_size={a.batch}",
        "eval_every=0",
        f"log_every={5 if not a.tiny else 2}",
        "checkpoint_every=0",
        "outer.checkpoint_every_rounds=1",
        *OUTER_SET,
        f"outer.local_steps={row_policy}",
    ]
    if a.tiny:
        args += [*TINY_MODEL[a.task], "calib_batches=2", "calib_batch_size=16", "eval_batch_size=128"]
    else:
        args += ["calib_batches=4"]
    return args + list(a.set or [])


def sim_command(a, run_dir: str, speeds, policy: str, coord_args: List[str], seed: int) -> List[str]:
    return [
        sys.executable,
        "-m",
        "dtrain.cli.sim",
        f"run_dir={run_dir}",
        f"sim.peers={len(PEERS)}",
        f"sim.rounds={a.rounds}",
        f"sim.inner_steps={a.sync_every}",
        f"sim.duration_s={a.budget_s:g}",
        f"sim.timeout_s={a.budget_s + 600:g}",
        f"sim.speed=[{','.join(f'{s:g}' for s in speeds)}]",
        f"sim.peer_args={json.dumps(peer_args(a, policy, seed))}",
        f"sim.coordinator_args={json.dumps(coord_args)}",
        "chaos.kill_at_s=[]",
        "chaos.join_at_s=[]",
        f"chaos.seed={seed}",
    ]


def _sigint_default() -> None:  # a background shell hands SIGINT down ignored; dtrain-sim stops cleanly on it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def started_pids(run_dir: str) -> List[int]:
    out = []
    for ev in read_jsonl(os.path.join(run_dir, "events.jsonl")):
        if ev.get("event") in ("peer_start", "coordinator_start") and isinstance(ev.get("pid"), int):
            out.append(ev["pid"])
    return out


def stop_sim(p: subprocess.Popen, run_dir: str) -> None:
    """SIGINT (dtrain-sim stops everything it started), then SIGKILL its session and each of its children's."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGINT)
            p.wait(60)
        except subprocess.TimeoutExpired:
            pass
    for pid in [p.pid] + started_pids(run_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def run_sim(a, key: str, speeds, policy: str, coord_args: List[str], seed: int, work: str) -> dict:
    """One dtrain-sim run; returns its run dir and the snapshots {path} of p0's / p1's checkpoints."""
    run_dir = os.path.join(work, f"{key}_s{seed}")
    snaps = os.path.join(work, f"{key}_s{seed}_snapshots")
    os.makedirs(snaps)
    watched = {p: os.path.join(run_dir, f"peer-{p}", "checkpoints", "latest.pt") for p in FAST}
    seen: Dict[str, int] = {}
    links: List[str] = []
    log_path = run_dir + ".out"
    cmd = sim_command(a, run_dir, speeds, policy, coord_args, seed)
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_sigint_default,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + a.budget_s + 600
            while p.poll() is None:
                for peer, path in watched.items():
                    try:
                        ino = os.stat(path).st_ino
                        if seen.get(peer) != ino:
                            dst = os.path.join(snaps, f"{peer}_{len(links):05d}.pt")
                            os.link(path, dst)  # the version now at path; a later replace leaves it to us
                            seen[peer] = os.stat(dst).st_ino
                            links.append(dst)
                    except FileNotFoundError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{key} seed {seed}: dtrain-sim ran past {a.budget_s + 600:g}s")
                time.sleep(POLL_S)
        finally:
            stop_sim(p, run_dir)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        raise RuntimeError(
            f"{key} seed {seed}: dtrain-sim wrote no summary (exit {p.returncode}):\n" + open(log_path).read()[-3000:]
        )
    return {"run_dir": run_dir, "snapshots": links, "exit": p.returncode, "seconds": time.time() - t0}


# ---------------------------------------------------------------- reading a run


def read_jsonl(path: str) -> List[dict]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def committed_rounds(run_dir: str) -> List[dict]:
    """[{round, time, steps: {peer: n}}] of every committed round, in round order (the coordinator's log)."""
    quorums: Dict[tuple, dict] = {}
    commits: Dict[int, dict] = {}
    for ev in read_jsonl(os.path.join(run_dir, "coordinator", "events.jsonl")):
        if ev.get("event") == "quorum":
            quorums[(ev.get("round"), ev.get("quorum_id"))] = ev  # the last quorum of (round, id) before its commit
        elif ev.get("event") == "commit" and isinstance(ev.get("round"), int):
            q = quorums.get((ev["round"], ev.get("quorum_id"))) or {}
            steps = {str(k): int(v) for k, v in (q.get("steps") or {}).items()}
            commits[ev["round"]] = {"round": ev["round"], "time": float(ev["time"]), "steps": steps}
    return [commits[r] for r in sorted(commits)]


def snapshot_rounds(paths: List[str]) -> Dict[int, str]:
    """round r -> a snapshot holding S_r (the global state after r committed rounds)."""
    import torch

    out: Dict[int, str] = {}
    for path in paths:
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a file we cannot read is no snapshot
            continue
        outer = st.get("outer") or {}
        if "round" in outer and "theta" in (outer.get("tensors") or {}):
            out.setdefault(int(outer["round"]), path)
    return out


def evaluate_state(path: str, peer_cfg: dict) -> Dict[str, float]:
    """Val and test accuracy (%) of the largest and smallest subnet of the global state in ``path``,
    BN recalibrated as the trainer's final evaluation does."""
    import torch

    from dtrain.data import build_data
    from dtrain.search.source import load_source
    from dtrain.train.evaluate import calibration_batches, evaluate_arch
    from dtrain.train.loop import resolve_eval_archs
    from dtrain.train.seeds import derive_seed

    torch.set_num_threads(1)
    src = load_source(path, "cpu", peer_cfg["data"])
    model = src.model
    data = build_data(src.data_cfg, getattr(src.model_cfg, "block_size", None))
    seed = int(peer_cfg.get("seed", 0))
    calib = calibration_batches(
        data.train, int(peer_cfg["calib_batches"]), int(peer_cfg["calib_batch_size"]), derive_seed(seed, "calib")
    )
    out = {"round": int(src.info.get("round", -1))}
    for name, arch in resolve_eval_archs(["max", "min"], model.space, seed):
        for split in ("val", "test"):
            res = evaluate_arch(
                model, arch, getattr(data, split), calib, int(peer_cfg["eval_batch_size"]), "cpu", model.task
            )
            out[f"{split}_{name}"] = 100.0 * res["acc"]
    return out


def measure(a, run: dict) -> dict:
    """Everything but the equal-samples accuracy (which needs every row of the seed)."""
    run_dir = run["run_dir"]
    summary = json.load(open(os.path.join(run_dir, "summary.json"), encoding="utf-8"))
    start = next(e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e.get("event") == "sim_start")
    t_end = float(start["time"]) + a.budget_s
    commits = committed_rounds(run_dir)
    in_budget = [c for c in commits if c["time"] <= t_end]
    k = len(in_budget)
    if [c["round"] for c in in_budget] != list(range(k)):
        raise RuntimeError(f"{run_dir}: committed rounds in the budget are not 0..{k - 1}")
    cum = [0]
    for c in in_budget:
        cum.append(cum[-1] + sum(c["steps"].values()) * a.batch)
    round_s = (in_budget[-1]["time"] - in_budget[0]["time"]) / (k - 1) if k >= 2 else NAN
    from dtrain.obs.run_series import peer_work

    # the summary's own per-peer definition, for every peer: dtrain-sim's summary leaves out a peer with no
    # round record (one that only ever healed), and with it the steps its heals replaced
    peers = {
        p: peer_work(p, read_jsonl(os.path.join(run_dir, f"peer-{p}", "metrics.jsonl")), a.sync_every) for p in PEERS
    }
    util = {p: _num(peers[p]["compute_utilisation"]) for p in PEERS}
    spr = {p: _num(peers[p]["mean_steps_per_round"]) for p in PEERS}
    applied = {p: sum(n for _, n in peers[p]["steps_per_round"]) for p in PEERS}
    lost = {p: int(peers[p]["steps_lost_rounds"]) + int(peers[p]["steps_lost_heals"]) for p in PEERS}
    cut = {p: peers[p]["steps_lost_after_last_round"] for p in PEERS}
    snaps = snapshot_rounds(run["snapshots"])
    peer_cfg = json.load(open(os.path.join(run_dir, "peer-p0", "config.json"), encoding="utf-8"))
    wall_round = max((r for r in snaps if r <= k), default=None)
    if wall_round is None:
        raise RuntimeError(f"{run_dir}: no checkpoint of a committed round was captured")
    return {
        "run_dir": run_dir,
        "status": summary.get("status"),
        "parity": summary.get("parity"),
        "rounds_lost": summary.get("rounds_lost"),
        "summary_peers": sorted(summary.get("peers") or {}),
        "rounds_in_budget": k,
        "round_s": round_s,
        "utilisation": util,
        "util_fast": _mean([util[p] for p in FAST]),
        "util_all": _mean(list(util.values())),
        "util_min": _min(list(util.values())),
        "steps_per_round": spr,
        "steps_applied": applied,
        "steps_lost": lost,
        "steps_lost_total": sum(lost.values()),
        "steps_cut_by_stop": cut,
        "samples_in_budget": cum[k],
        "samples_per_s": cum[k] / a.budget_s,
        "cum_samples": cum,
        "snapshot_rounds": sorted(snaps),
        "_snaps": snaps,
        "_peer_cfg": peer_cfg,
        "wall": {"round": wall_round, "samples": cum[wall_round], **evaluate_state(snaps[wall_round], peer_cfg)},
        "seconds": run["seconds"],
    }


def at_samples(m: dict, s_star: int) -> dict:
    """The row read at the state whose cumulated samples are nearest ``s_star`` (ties: the earlier)."""
    k = m["rounds_in_budget"]
    cands = [r for r in m["_snaps"] if r <= k]
    r = min(cands, key=lambda r: (abs(m["cum_samples"][r] - s_star), r))
    if r == m["wall"]["round"]:
        acc = {x: v for x, v in m["wall"].items() if x not in ("round", "samples")}
    else:
        acc = evaluate_state(m["_snaps"][r], m["_peer_cfg"])
        acc.pop("round", None)
    return {"round": r, "samples": m["cum_samples"][r], **acc}


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else NAN


def _mean(vals) -> float:
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else NAN


def _min(vals) -> float:
    vals = [v for v in vals if math.isfinite(v)]
    return min(vals) if vals else NAN


def gap(ref: dict, x: dict) -> float:
    """Test-accuracy points x is below ref, on the worse of the largest and smallest subnet."""
    return max(ref["test_max"] - x["test_max"], ref["test_min"] - x["test_min"])


# ---------------------------------------------------------------- report


def _per_peer(d: Dict[str, float], fmt: str = "{:.0f}") -> str:
    return "/".join("n/a" if not math.isfinite(_num(d.get(p))) else fmt.format(d[p]) for p in PEERS)


def _avg_dicts(ds: List[dict]) -> dict:
    return {p: _mean([_num(d.get(p)) for d in ds]) for p in PEERS}


def _acc_mean(points: List[dict]) -> dict:
    keys = ("val_max", "val_min", "test_max", "test_min", "samples", "round")
    return {k: _mean([_num(pt[k]) for pt in points]) for k in keys}


def build_rows(per_seed: List[Dict[str, dict]]) -> List[dict]:
    rows = []
    for key, label, speeds, policy, coord in ROWS:
        ms = [s[key] for s in per_seed]
        rows.append(
            {
                "row": key,
                "label": label,
                "speeds": speeds,
                "local_steps": policy,
                "coordinator_args": coord,
                "seeds": len(ms),
                "rounds_in_budget": _mean([m["rounds_in_budget"] for m in ms]),
                "round_s": _mean([m["round_s"] for m in ms]),
                "util_fast": _mean([m["util_fast"] for m in ms]),
                "util_all": _mean([m["util_all"] for m in ms]),
                "util_min": _mean([m["util_min"] for m in ms]),
                "utilisation": _avg_dicts([m["utilisation"] for m in ms]),
                "mean_steps_per_round": _avg_dicts([m["steps_per_round"] for m in ms]),
                "steps_applied": _avg_dicts([m["steps_applied"] for m in ms]),
                "steps_lost": _avg_dicts([m["steps_lost"] for m in ms]),
                "steps_lost_total": _mean([m["steps_lost_total"] for m in ms]),
                "samples_per_s": _mean([m["samples_per_s"] for m in ms]),
                "wall": _acc_mean([m["wall"] for m in ms]),
                "equal_samples": _acc_mean([m["equal"] for m in ms]),
                "per_seed": [{k: v for k, v in m.items() if not k.startswith("_") and k != "cum_samples"} for m in ms],
            }
        )
    return rows


def build_targets(per_seed: List[Dict[str, dict]]) -> List[dict]:
    ratio = max((s["c"]["round_s"] / s["a"]["round_s"] for s in per_seed), key=_nan_high)
    util_worst = None  # (margin, value, threshold)
    for s in per_seed:
        a_util = s["a"]["util_all"]
        thr = 0.90 if (math.isfinite(a_util) and a_util >= 0.93) else a_util - 0.03
        v = s["c"]["util_min"]
        margin = v - thr if math.isfinite(v) and math.isfinite(thr) else -math.inf
        if util_worst is None or margin < util_worst[0]:
            util_worst = (margin, v, thr)
    _, util_v, util_thr = util_worst
    thr_txt = f"{util_thr:.3f}" if math.isfinite(util_thr) else "0.900"
    return [
        target("c_round_time_vs_a", ratio, "<= 1.15"),
        target("c_min_peer_utilisation", util_v, f">= {thr_txt}"),
        target("c_steps_lost", max(float(s["c"]["steps_lost_total"]) for s in per_seed), "<= 0"),
        target(
            "c_vs_b_test_gap_equal_wallclock_pts",
            max((gap(s["b"]["wall"], s["c"]["wall"]) for s in per_seed), key=_nan_high),
            "<= 0",
        ),
        target(
            "c_vs_a_test_gap_equal_samples_pts",
            max((gap(s["a"]["equal"], s["c"]["equal"]) for s in per_seed), key=_nan_high),
            "<= 0.5",
        ),
    ]


def _nan_high(v: float) -> float:
    return math.inf if not math.isfinite(v) else v


def _table(headers: List[str], rows: List[List], title: str) -> str:
    """A text table: the first column left-aligned, the others (numbers formatted here) right-aligned."""
    cells = [[c if isinstance(c, str) else ("n/a" if not math.isfinite(c) else f"{c:.2f}") for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(r):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([title, line(headers), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells])


def print_report(a, rows: List[dict], targets: List[dict]) -> None:
    model = {"digits": "digits, mbv3_tiny", "text": "text, gpt_tiny"}[a.task] + (" (tiny)" if a.tiny else "")
    print(
        _table(
            [
                "row",
                "rounds",
                "round s",
                "util fast",
                "util all",
                "util min",
                "steps/round p0/p1/p2/p3",
                "steps applied",
                "steps lost",
                "samples/s",
            ],
            [
                [
                    r["label"],
                    f"{r['rounds_in_budget']:.1f}",
                    r["round_s"],
                    r["util_fast"],
                    r["util_all"],
                    r["util_min"],
                    _per_peer(r["mean_steps_per_round"], "{:.1f}"),
                    _per_peer(r["steps_applied"]),
                    _per_peer(r["steps_lost"]),
                    f"{r['samples_per_s']:.1f}",
                ]
                for r in rows
            ],
            title=f"{model}, 4 peers, H={a.sync_every}, batch {a.batch}, budget {a.budget_s:g}s, "
            f"mean of {a.seeds} seed(s): time and work in the budget",
        )
    )
    print()
    print(
        _table(
            [
                "row",
                "samples @B",
                "val max",
                "val min",
                "test max",
                "test min",
                "equal samples",
                "val max",
                "val min",
                "test max",
                "test min",
            ],
            [
                [
                    r["label"],
                    f"{r['wall']['samples']:.0f}",
                    r["wall"]["val_max"],
                    r["wall"]["val_min"],
                    r["wall"]["test_max"],
                    r["wall"]["test_min"],
                    f"{r['equal_samples']['samples']:.0f}",
                    r["equal_samples"]["val_max"],
                    r["equal_samples"]["val_min"],
                    r["equal_samples"]["test_max"],
                    r["equal_samples"]["test_min"],
                ]
                for r in rows
            ],
            title="accuracy % (max / min subnet, after BN recalibration): at the end of the budget | at equal samples",
        )
    )
    print()
    print(
        format_table(
            ["target (worst seed)", "value", "wanted", "met"],
            [[t["name"], t["value"], t["target"], "yes" if t["met"] else "NO"] for t in targets],
        )
    )
    missed = [t["name"] for t in targets if not t["met"]]
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="digits")
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--budget-s", type=positive_float, default=None, help="wall-clock budget per run (default 180)")
    p.add_argument("--sync-every", type=positive_int, default=None, help="H (default 20)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size per peer (default 32)")
    p.add_argument(
        "--rounds", type=positive_int, default=1000, help="sim.rounds: the LR schedule spans rounds x H steps"
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an extra dtrain-train override for every peer of every row (repeatable)",
    )
    p.add_argument("--tiny", action="store_true", help="a small model, H=4, batch 16, a 20 s budget (tests)")
    p.add_argument("--work-dir", default="", help="keep the runs here (default: a temporary dir, removed)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    for o in a.set or []:
        if "=" not in o or o.startswith("="):
            p.error(f"--set: {o!r} is not of the form KEY=VALUE")
    a.budget_s = a.budget_s or (20.0 if a.tiny else 180.0)
    a.sync_every = a.sync_every or (4 if a.tiny else 20)
    a.batch = a.batch or (16 if a.tiny else 32)
    if a.work_dir and os.path.exists(a.work_dir) and os.listdir(a.work_dir):
        p.error(f"--work-dir {a.work_dir!r} is not empty")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated bench still stops its simulations

    t_start = time.time()
    work = a.work_dir or tempfile.mkdtemp(prefix="dtrain-strag-")
    os.makedirs(work, exist_ok=True)
    per_seed: List[Dict[str, dict]] = []
    try:
        for seed in range(a.seeds):
            ms: Dict[str, dict] = {}
            for key, label, speeds, policy, coord in ROWS:
                run = run_sim(a, key, speeds, policy, coord, seed, work)
                m = measure(a, run)
                ms[key] = m
                w = m["wall"]
                print(
                    f"    {label} seed {seed}: {m['rounds_in_budget']} rounds, {m['round_s']:.2f} s/round, "
                    f"util {_per_peer(m['utilisation'], '{:.2f}')}, steps/round "
                    f"{_per_peer(m['steps_per_round'], '{:.1f}')}, lost {_per_peer(m['steps_lost'])}, "
                    f"{m['samples_in_budget']} samples | test max {w['test_max']:.2f}% min {w['test_min']:.2f}% "
                    f"({run['seconds']:.0f}s, sim {m['status']}, parity {m['parity']})",
                    flush=True,
                )
            s_star = min(m["samples_in_budget"] for m in ms.values())
            for m in ms.values():
                m["equal"] = at_samples(m, s_star)
                m["equal_samples_target"] = s_star
            print(
                f"    seed {seed}: equal samples {s_star}: "
                + ", ".join(
                    f"({k}) round {m['equal']['round']} {m['equal']['samples']} samples "
                    f"test {m['equal']['test_max']:.2f}/{m['equal']['test_min']:.2f}%"
                    for k, m in ms.items()
                ),
                flush=True,
            )
            for m in ms.values():  # the snapshots of this seed are no longer needed
                for path in set(m["_snaps"].values()) | set(run_paths(m)):
                    _unlink(path)
            per_seed.append(ms)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    rows = build_rows(per_seed)
    targets = build_targets(per_seed)
    print()
    print_report(a, rows, targets)
    print(f"bench time: {time.time() - t_start:.0f}s")
    if a.json:
        write_json(
            a.json,
            rows,
            targets,
            settings={k: v for k, v in vars(a).items()},
            method=__doc__.split("How each run is measured:")[1].split("Targets (")[0].strip(),
            bench_seconds=time.time() - t_start,
        )
    return 0


def run_paths(m: dict) -> List[str]:
    d = m["run_dir"] + "_snapshots"
    return [os.path.join(d, f) for f in os.listdir(d)] if os.path.isdir(d) else []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"stragglers: {e}", file=sys.stderr)
        sys.exit(1)
