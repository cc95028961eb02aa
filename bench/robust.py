"""One bad peer of four: the plain mean against the bounded means (``outer.aggregate``).

Every row is a ``dtrain-sim`` run of four real training peers (digits, the
``mbv3_tiny`` space, the shipped DiLoCo outer optimizer: Nesterov, lr 0.7,
momentum 0.9) for ``--rounds`` rounds of ``--sync-every`` inner steps, no
chaos, one after the other on this machine. Peer ``p3`` is the bad one:

- ``clean``: no bad peer;
- ``lr x10`` / ``lr x100`` / ``lr x1000``: p3 trains with ``optim.lr``
  10, 100, 1000 times the others' (a typo in one machine's config), through
  ``sim.peer_overrides``;
- ``sign flip``: p3 sends its pseudo-gradient negated. This is the one row
  that needs a **test-only hook**: the test suite's fault plugin
  (``tests/fault_plugin.py``, loaded with ``DTRAIN_FAULT_PLUGIN``) scales the
  pseudo-gradient of the peer named by ``DTRAIN_FAULT_SCALE_PEER`` by
  ``DTRAIN_FAULT_SCALE_PSEUDO_GRADIENT=-1``; nothing in ``dtrain/`` can do it.

each with ``outer.aggregate=mean``, ``clipped`` and ``trimmed`` (``outer.trim=1``:
per coordinate the largest and the smallest of the four values are dropped).

Columns: the final global model's test accuracy of the largest and the
smallest subnet (the trainer's final evaluation, BN recalibrated), rounds
committed, parity, the bad peer's clip factors over the rounds (min and
median of the ``contributions`` in p0's round records), the mean round wall
time and the extra time per round against ``mean`` in the same scenario.

Seed noise: the clean rows of ``mean`` and ``clipped`` are also run on the
held-out seeds ``--noise-seeds`` (default 2 more seeds); the noise is the
spread (max - min) of ``mean``'s clean accuracy over all seeds.

Targets (issue "one bad peer"):

- with ``clipped``, every bad-peer row within 1 point of ``clipped``'s clean
  row (the worse of the max and min subnets);
- with no bad peer, ``clipped`` within seed noise of ``mean`` (mean over
  the seeds);
- parity on every round of every row;
- ``clipped``'s clean rounds at most 5 % longer than ``mean``'s.

    python bench/robust.py [--rounds 12] [--sync-every 25] [--batch 16] [--seed 3]
                           [--noise-seeds 2] [--aggregates mean,clipped,trimmed] [--json PATH]
                           [--work-dir DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from stragglers import TINY_MODEL, read_jsonl, stop_sim  # noqa: E402

from dtrain.config import OptimConfig  # noqa: E402

from _common import format_table, positive_int, target, write_json  # noqa: E402

PEERS = 4
BAD = "p3"
INNER_LR = OptimConfig().lr  # the shipped inner learning rate: the bad rows multiply it
SCENARIOS: List[Tuple[str, List[str], Dict[str, str]]] = [  # name, p3's overrides, environment
    ("clean", [], {}),
    ("lr x10", [f"optim.lr={INNER_LR * 10:g}"], {}),
    ("lr x100", [f"optim.lr={INNER_LR * 100:g}"], {}),
    ("lr x1000", [f"optim.lr={INNER_LR * 1000:g}"], {}),
    (
        "sign flip",
        [],
        {
            "DTRAIN_FAULT_PLUGIN": "fault_plugin.PLUGIN",
            "DTRAIN_FAULT_SCALE_PSEUDO_GRADIENT": "-1",
            "DTRAIN_FAULT_SCALE_PEER": BAD,
        },
    ),
]
AGGREGATES = ("mean", "clipped", "trimmed")
NAN = float("nan")


def _aggregates(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in AGGREGATES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(AGGREGATES)}, got {text!r}")
    return names


def peer_args(a, aggregate: str, seed: int) -> List[str]:
    args = [
        "model=mbv3_tiny",
        "data=digits",
        f"seed={seed}",
        f"batch_size={a.batch}",
        "eval_every=0",
        "log_every=5",
        "checkpoint_every=0",
        f"outer.aggregate={aggregate}",
        "outer.trim=1",
    ]
    if a.tiny:
        args += [*TINY_MODEL["digits"], "calib_batches=2", "calib_batch_size=16", "eval_batch_size=128"]
    else:
        args += ["calib_batches=4"]
    return args


def sim_command(a, run_dir: str, aggregate: str, bad_overrides: List[str], seed: int) -> List[str]:
    overrides = [[] for _ in range(PEERS - 1)] + [bad_overrides]
    return [
        sys.executable,
        "-m",
        "dtrain.cli.sim",
        f"run_dir={run_dir}",
        f"sim.peers={PEERS}",
        f"sim.rounds={a.rounds}",
        f"sim.inner_steps={a.sync_every}",
        f"sim.timeout_s={a.timeout_s:g}",
        f"sim.peer_args={json.dumps(peer_args(a, aggregate, seed))}",
        f"sim.peer_overrides={json.dumps(overrides)}",
        "chaos.kill_at_s=[]",
        "chaos.join_at_s=[]",
        f"chaos.seed={seed}",
    ]


def run_one(a, scenario: str, aggregate: str, seed: int, work: str) -> dict:
    """One dtrain-sim run to its last round; what the table needs from it."""
    name = dict((s[0], s) for s in SCENARIOS)[scenario]
    _, bad_overrides, env = name
    run_dir = os.path.join(work, f"{scenario.replace(' ', '_')}_{aggregate}_s{seed}")
    cmd = sim_command(a, run_dir, aggregate, bad_overrides, seed)
    pythonpath = os.pathsep.join(p for p in (os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")) if p)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if env:
        child_env["PYTHONPATH"] = pythonpath  # the fault plugin lives in tests/
    t0 = time.time()
    with open(run_dir + ".out", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=child_env)
        try:
            p.wait(a.timeout_s + 60)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_sim(p, run_dir)
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        tail = open(run_dir + ".out", encoding="utf-8", errors="replace").read()[-3000:]
        raise RuntimeError(f"{scenario} / {aggregate} seed {seed}: dtrain-sim wrote no summary:\n{tail}")
    with open(path, encoding="utf-8") as f:
        s = json.load(f)
    return measure(run_dir, s, scenario, aggregate, seed, time.time() - t0)


def measure(run_dir: str, s: dict, scenario: str, aggregate: str, seed: int, seconds: float) -> dict:
    acc = s.get("final_accuracy") or {}
    records = [r for r in read_jsonl(os.path.join(run_dir, "peer-p0", "metrics.jsonl")) if r.get("kind") == "round"]
    clips = [
        float(r["contributions"][BAD]["clip"])
        for r in records
        if isinstance(r.get("contributions"), dict) and BAD in r["contributions"]
    ]
    round_s = [float(r["round_s"]) for r in records[1:] if "round_s" in r]  # round 0 holds the start-up
    return {
        "scenario": scenario,
        "aggregate": aggregate,
        "seed": seed,
        "test_max": 100 * float(acc.get("max", NAN)),
        "test_min": 100 * float(acc.get("min", NAN)),
        "rounds": int(s.get("rounds_committed", 0)),
        "parity": bool(s.get("parity")) and int(s.get("rounds_checked", 0)) > 0,
        "bad_clip_min": min(clips) if clips else NAN,
        "bad_clip_median": statistics.median(clips) if clips else NAN,
        "round_s": statistics.mean(round_s) if round_s else NAN,
        "seconds": seconds,
        "ok": bool(s.get("ok")),
    }


def _worse(row: dict) -> float:
    return min(row["test_max"], row["test_min"])


def _find(rows: List[dict], scenario: str, aggregate: str, seed: int) -> Optional[dict]:
    for r in rows:
        if (r["scenario"], r["aggregate"], r["seed"]) == (scenario, aggregate, seed):
            return r
    return None


def build_targets(rows: List[dict], seed: int, seeds: List[int]) -> List[dict]:
    out = []
    clean = _find(rows, "clean", "clipped", seed)
    for scenario, _, _ in SCENARIOS[1:]:
        bad = _find(rows, scenario, "clipped", seed)
        if clean is not None and bad is not None:
            out.append(target(f"clipped, {scenario}: points below clean", _worse(clean) - _worse(bad), "<= 1.0"))
    means = [_find(rows, "clean", "mean", s) for s in seeds]
    clips = [_find(rows, "clean", "clipped", s) for s in seeds]
    if all(means) and all(clips):
        noise = max(_worse(m) for m in means if m) - min(_worse(m) for m in means if m)
        gap = statistics.mean(_worse(m) for m in means if m) - statistics.mean(_worse(c) for c in clips if c)
        out.append(target(f"clean: clipped below mean, points (seed noise {noise:.2f})", gap, f"<= {noise:.4f}"))
    out.append(target("rows without parity on every round", sum(not r["parity"] for r in rows), "<= 0"))
    m, c = _find(rows, "clean", "mean", seed), _find(rows, "clean", "clipped", seed)
    if m is not None and c is not None and m["round_s"] > 0:
        out.append(target("clean: clipped round time / mean's", c["round_s"] / m["round_s"], "<= 1.05"))
    return out


def table(rows: List[dict], seed: int) -> str:
    base = {r["scenario"]: r for r in rows if r["aggregate"] == "mean" and r["seed"] == seed}
    body = []
    for r in rows:
        if r["seed"] != seed:
            continue
        ref = base.get(r["scenario"])
        extra = (r["round_s"] / ref["round_s"] - 1) * 100 if ref and ref["round_s"] > 0 else NAN
        body.append(
            [
                r["scenario"],
                r["aggregate"],
                r["test_max"],
                r["test_min"],
                r["rounds"],
                r["parity"],
                r["bad_clip_min"],
                r["bad_clip_median"],
                r["round_s"],
                extra,
            ]
        )
    headers = ["bad peer", "aggregate", "test max %", "test min %", "rounds", "parity"]
    headers += ["p3 clip min", "p3 clip median", "round s", "extra time %"]
    return format_table(headers, body, title=f"one bad peer of {PEERS} (seed {seed})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=positive_int, default=None, help="rounds per run (default 12)")
    p.add_argument("--sync-every", type=positive_int, default=None, help="H (default 25)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size per peer (default 16)")
    p.add_argument("--seed", type=int, default=3, help="the seed of every row (default 3)")
    p.add_argument("--noise-seeds", type=int, default=None, help="held-out seeds for the clean rows (default 2)")
    p.add_argument("--aggregates", type=_aggregates, default=list(AGGREGATES))
    p.add_argument("--tiny", action="store_true", help="a small model, 2 rounds of 4 steps, no noise seeds (tests)")
    p.add_argument("--work-dir", default="", help="keep the runs here (default: a temporary dir, removed)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    if a.noise_seeds is not None and a.noise_seeds < 0:
        p.error(f"--noise-seeds: expected an integer >= 0, got {a.noise_seeds}")
    a.rounds = a.rounds or (2 if a.tiny else 12)
    a.sync_every = a.sync_every or (4 if a.tiny else 25)
    a.batch = a.batch or 16
    a.noise_seeds = a.noise_seeds if a.noise_seeds is not None else (0 if a.tiny else 2)
    a.timeout_s = 300.0 if a.tiny else 1200.0
    seeds = [a.seed] + [a.seed + 1 + i for i in range(a.noise_seeds)]
    work = a.work_dir or tempfile.mkdtemp(prefix="dtrain-robust-")
    os.makedirs(work, exist_ok=True)
    rows: List[dict] = []
    t0 = time.time()
    for scenario, _, _ in SCENARIOS:
        for aggregate in a.aggregates:
            r = run_one(a, scenario, aggregate, a.seed, work)
            rows.append(r)
            print(
                f"  {scenario} / {aggregate}: test max {r['test_max']:.2f}% min {r['test_min']:.2f}%, "
                f"{r['rounds']} rounds, parity {r['parity']}, p3 clip min {r['bad_clip_min']:.3g}, "
                f"{r['round_s']:.2f} s/round ({r['seconds']:.0f}s)",
                flush=True,
            )
    for seed in seeds[1:]:
        for aggregate in [x for x in ("mean", "clipped") if x in a.aggregates]:
            r = run_one(a, "clean", aggregate, seed, work)
            rows.append(r)
            print(f"  clean / {aggregate} seed {seed}: test max {r['test_max']:.2f}% min {r['test_min']:.2f}%")
    targets = build_targets(rows, a.seed, seeds)
    print()
    print(table(rows, a.seed))
    print()
    print(
        format_table(
            ["target", "value", "bound", "met"], [[t["name"], t["value"], t["target"], t["met"]] for t in targets]
        )
    )
    print(f"\n{len(rows)} runs in {time.time() - t0:.0f}s")
    if a.json:
        write_json(a.json, rows, targets, seeds=seeds, rounds=a.rounds, sync_every=a.sync_every, batch=a.batch)
    if not a.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
