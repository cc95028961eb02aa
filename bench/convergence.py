"""Convergence of the supernet on digits: DiLoCo against the ddp baseline, and the codecs.

Every configuration runs ``--peers`` real training peers (``dtrain-train``
processes, one thread each) around a fresh coordinator, at EQUAL TOTAL
SAMPLES: each peer trains ``--steps`` inner steps of ``--batch`` samples, so
peers x steps x batch is the same for every row (the default equals one
peer's default run: 4 x 300 x 16 = 300 x 64). Rows:

- ``ddp``: gradients all-reduced across the peers every step (fp32);
- ``diloco fp32 nesterov``: H = ``--sync-every`` inner steps per round, DiLoCo's
  outer optimizer as shipped in ``conf/outer/diloco.yaml`` (Nesterov SGD,
  lr 0.7, momentum 0.9), grpc collective; shown for reference;
- ``diloco fp32 / int8 / int4``: the same, with the outer optimizer of
  ``--outer-set`` (default ``outer.lr=1.0 outer.momentum=0.0``: the mean
  pseudo-gradient applied as it is, i.e. plain parameter averaging).

Why two outer optimizers: the default run has only 300 / 25 = 12 outer
rounds, and early pseudo-gradients point the same way round after round, so
momentum 0.9 scales them by up to 1 + 0.9 / (1 - 0.9) = 10 (x lr 0.7 = 7).
One seed in three overshoots and never recovers. The default ``--outer-set``
was chosen on the VALIDATION split over 3 seeds (lr/momentum 0.7/0.9,
1.0/0.0 and 0.7/0.5; numbers in the README), never on test; the targets
are then read on test.

Reported: the test (and val) accuracy, after BN recalibration, of the largest
and the smallest subnet of the final global model, averaged over ``--seeds``,
and the worst single-seed test accuracy of the row. Targets: ``diloco fp32``
at most 1 point below ddp; int8 and int4 at most 0.5 points below fp32 (gaps
are taken on the worse of the two subnets; a row that does better than its
reference has gap <= 0). The digits test split has 359 images, so one image
is 0.28 points: small gaps are within seed noise, which is why ``--seeds``
exists. Training is deterministic: the same seed gives the same accuracy on
any load.

    python bench/convergence.py [--peers 4] [--steps 300] [--batch 16] [--sync-every 25]
                                [--seeds 3] [--configs NAMES] [--outer-set outer.KEY=VALUE ...]
                                [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import format_table, positive_int, target, write_json  # noqa: E402

OUTER_SET = ["outer.lr=1.0", "outer.momentum=0.0"]  # the tuned rows' outer optimizer (chosen on val)
TUNED = "tuned"  # marks the rows that take --outer-set
CONFIGS = [
    ("ddp", ["outer=ddp"]),
    ("diloco fp32 nesterov", ["outer=diloco", "outer.codec=fp32"]),
    ("diloco fp32", ["outer=diloco", "outer.codec=fp32", TUNED]),
    ("diloco int8", ["outer=diloco", "outer.codec=int8", TUNED]),
    ("diloco int4", ["outer=diloco", "outer.codec=int4", TUNED]),
]


def start_coordinator(state_dir: str, peers: int):
    os.makedirs(state_dir, exist_ok=True)
    out = os.path.join(state_dir, "coord.out")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dtrain.cli.coordinator",
            f"state_dir={state_dir}",
            "port=0",
            f"min_peers={peers}",
            "grace_s=2",
            "lease_timeout_s=30",
            "commit_timeout_s=120",
        ],
        stdout=open(out, "w"),
        stderr=open(os.path.join(state_dir, "coord.err"), "w"),
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(out) as f:
            line = f.readline()
        if line.endswith("\n"):
            return p, line.split()[-1]
        if p.poll() is not None:
            break
        time.sleep(0.1)
    stop(p)
    raise RuntimeError("the coordinator did not start: " + open(os.path.join(state_dir, "coord.err")).read()[-2000:])


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_config(name: str, overrides: List[str], a, seed: int, work: str) -> Dict[str, float]:
    d = os.path.join(work, f"{name.replace(' ', '_')}_s{seed}")
    os.makedirs(d)
    coord, address = start_coordinator(os.path.join(d, "coord"), a.peers)
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    try:
        for i in range(a.peers):
            cmd = [
                sys.executable,
                "-m",
                "dtrain.cli.train",
                f"run_dir={d}/p{i}",
                f"peer_id=p{i}",
                f"control.coordinator={address}",
                f"steps={a.steps}",
                f"batch_size={a.batch}",
                f"outer.sync_every={a.sync_every}",
                f"seed={seed}",
                "eval_every=0",
                "checkpoint_every=0",
                "threads=1",
                "logger.progress=off",
                *overrides,
            ]
            procs.append(
                subprocess.Popen(cmd, stdout=open(f"{d}/p{i}.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            )
        for i, p in enumerate(procs):
            if p.wait(timeout=a.timeout) != 0:
                raise RuntimeError(f"{name}: peer p{i} failed:\n" + open(f"{d}/p{i}.log").read()[-2000:])
    finally:
        for p in procs:
            stop(p)
        stop(coord)
    res = json.load(open(f"{d}/p0/summary.json"))["results"]
    rounds = sum(1 for line in open(f"{d}/p0/metrics.jsonl") if '"kind": "round"' in line)
    return {
        "max": 100 * res["max"]["test_acc"],
        "min": 100 * res["min"]["test_acc"],
        "val_max": 100 * res["max"]["val_acc"],
        "val_min": 100 * res["min"]["val_acc"],
        "seconds": time.time() - t0,
        "rounds": rounds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--sync-every", type=positive_int, default=25)
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds per configuration")
    p.add_argument(
        "--configs",
        default=",".join(n for n, _ in CONFIGS),
        help="comma-separated subset of: " + ", ".join(n for n, _ in CONFIGS),
    )
    p.add_argument(
        "--outer-set",
        action="append",
        default=None,
        metavar="outer.KEY=VALUE",
        help="outer optimizer of the diloco fp32/int8/int4 rows (repeatable; replaces the default "
        + " ".join(OUTER_SET)
        + ")",
    )
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated bench still stops its peers
    if a.outer_set is None:
        a.outer_set = list(OUTER_SET)
    for o in a.outer_set:
        if not o.startswith("outer.") or "=" not in o:
            p.error(f"--outer-set: {o!r} is not of the form outer.KEY=VALUE")
    chosen = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in chosen:
        if c not in dict(CONFIGS):
            p.error(f"--configs: {c!r} is not one of {', '.join(n for n, _ in CONFIGS)}")
    if a.steps % a.sync_every:
        p.error(f"--steps={a.steps} must be a multiple of --sync-every={a.sync_every}")
    rows, acc = [], {}
    with tempfile.TemporaryDirectory(prefix="dtrain-conv-") as work:
        for name, overrides in [(n, o) for n, o in CONFIGS if n in chosen]:
            if TUNED in overrides:
                overrides = [o for o in overrides if o != TUNED] + a.outer_set
            runs = [run_config(name, overrides, a, seed, work) for seed in range(a.seeds)]
            for seed, r in enumerate(runs):
                print(
                    f"    {name} seed {seed}: test max {r['max']:.2f}% min {r['min']:.2f}% | "
                    f"val max {r['val_max']:.2f}% min {r['val_min']:.2f}%",
                    flush=True,
                )
            m = {
                k: sum(r[k] for r in runs) / len(runs)
                for k in ("max", "min", "val_max", "val_min", "seconds", "rounds")
            }
            acc[name] = m
            rows.append(
                {
                    "config": name,
                    "outer": [o for o in overrides if o.startswith("outer.")],
                    "peers": a.peers,
                    "steps": a.steps,
                    "batch": a.batch,
                    "samples": a.peers * a.steps * a.batch,
                    "H": 1 if name == "ddp" else a.sync_every,
                    "rounds": int(m["rounds"]),
                    "max_test_acc": m["max"],
                    "min_test_acc": m["min"],
                    "max_val_acc": m["val_max"],
                    "min_val_acc": m["val_min"],
                    "seed_min_test_acc": min(min(r["max"], r["min"]) for r in runs),
                    "seconds": m["seconds"],
                }
            )
            print(f"  {name}: max {m['max']:.2f}%  min {m['min']:.2f}%  ({m['seconds']:.0f}s)", flush=True)

    def gap(worse: str, ref: str) -> float:
        if worse not in acc or ref not in acc:
            return float("nan")  # not measured in this run
        return max(acc[ref]["max"] - acc[worse]["max"], acc[ref]["min"] - acc[worse]["min"])

    targets = [
        target("diloco_vs_ddp_gap_pts", gap("diloco fp32", "ddp"), "<= 1.0"),
        target("int8_vs_fp32_gap_pts", gap("diloco int8", "diloco fp32"), "<= 0.5"),
        target("int4_vs_fp32_gap_pts", gap("diloco int4", "diloco fp32"), "<= 0.5"),
    ]
    print(
        format_table(
            [
                "config",
                "H",
                "rounds",
                "samples",
                "max test %",
                "min test %",
                "max val %",
                "min val %",
                "worst seed test %",
                "seconds",
            ],
            [
                [
                    r["config"],
                    r["H"],
                    r["rounds"],
                    r["samples"],
                    r["max_test_acc"],
                    r["min_test_acc"],
                    r["max_val_acc"],
                    r["min_val_acc"],
                    r["seed_min_test_acc"],
                    r["seconds"],
                ]
                for r in rows
            ],
            title=f"digits, tiny mbv3 supernet, {a.peers} peers, equal total samples, {a.seeds} seed(s); "
            f"diloco fp32/int8/int4: {' '.join(a.outer_set)}",
        )
    )
    print()
    print(
        format_table(
            ["target", "value", "wanted", "met"],
            [[t["name"], t["value"], t["target"], "yes" if t["met"] else "NO"] for t in targets],
        )
    )
    missed = [t["name"] for t in targets if not t["met"]]
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")
    if a.json:
        write_json(a.json, rows, targets, settings=vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
