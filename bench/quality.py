"""Quality of the weight-sharing supernet on digits: subnets against their standalone twins.

The Once-for-All claim: a subnet taken out of a supernet trained with the
sandwich rule and in-place distillation (then BN-recalibrated) is as good as
the same architecture trained alone from scratch. Per seed this bench trains:

- ``supernet``: dtrain's own ``Trainer`` on the default config
  (``model=mbv3_tiny data=digits``, default sandwich: uniform schedule, max +
  min + 2 random, KD in-place distillation), ``--steps`` steps;
- the ablations, each a fresh supernet: ``no-distill``
  (``sandwich.distill=none``: the small subnets learn from hard labels) and
  ``delayed`` (``sandwich=delayed``: the largest subnet alone for the first
  half, then the sandwich with a ramp);
- ``standalone``: five static networks, one per chosen architecture, each
  extracted from a freshly initialised supernet (the same init seed as the
  supernet, so each twin starts from the weights its supernet subnet starts
  from) and trained alone the way the sandwich trains its largest subnet: the
  same steps, batch size, batch order, AdamW with the same weight-decay
  groups, warm-up + cosine LR, gradient clipping, label smoothing and dropout.

The five architectures spread over the MACs range: the smallest, the largest
and the three candidates (from a seeded pool of random subnets) whose MACs lie
closest to 25 / 50 / 75 % of the way between them. Each is evaluated on the
test split; supernet subnets after BN recalibration (``evaluate_arch``),
standalone nets in eval mode with their own running statistics. As a side
check each recalibrated subnet is also extracted into a static network and
evaluated: it must score exactly what the supernet scored.

Target: every subnet within 1 point of its standalone twin (gap = standalone
minus supernet, test accuracy in points, <= 1.0), and all five together. The
digits test split has 359 images, so one image is 0.28 points; ``--seeds N``
averages the accuracies over seeds 0..N-1 before taking gaps.

    python bench/quality.py [--steps 300] [--seeds 1] [--jobs 1] [--out DIR] [--json PATH]
    python bench/quality.py --quick --json /tmp/q.json    # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from _common import format_table, positive_int, target, write_json  # noqa: E402

GAP_TARGET = "<= 1.0"
# (name, Hydra overrides on top of the default train config)
VARIANTS = [
    ("supernet", []),
    ("no-distill", ["sandwich.distill=none"]),
    ("delayed", ["sandwich=delayed"]),
]
POSITIONS = [(0.0, "min"), (0.25, "p25"), (0.5, "p50"), (0.75, "p75"), (1.0, "max")]
QUICK_POSITIONS = [(0.0, "min"), (1.0, "max")]
CANDIDATES = 4000  # size of the seeded pool the in-between archs come from
# --quick: a two-stage space, a few steps of small batches (the smoke test, seconds)
QUICK = dict(
    steps=3,
    overrides=[
        "batch_size=16",
        "calib_batches=1",
        "calib_batch_size=16",
        "eval_batch_size=512",
        "model.stages=[{channels:8,stride:1,act:relu,se:false},{channels:16,stride:2,act:hswish,se:true}]",
        "model.final_expand=2",
        "model.feature_dim=32",
        "model.depths=[1,2]",
        "model.kernel_sizes=[3,5]",
        "model.expand_ratios=[2,3]",
        "model.resolutions=[8,12]",
    ],
)


# -- configuration -------------------------------------------------------------------------
def compose_train(overrides: List[str]):
    """The typed ``TrainConfig`` of ``conf/train.yaml`` plus ``overrides``, as dtrain-train composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dtrain.cli.app import conf_dir, to_object
    from dtrain.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return to_object(compose("train", overrides=list(overrides)))
    finally:
        GlobalHydra.instance().clear()


def variant_config(steps: Optional[int], extra: List[str]):
    """A variant's config; bench bookkeeping only (no mid-run eval or checkpoints, one
    thread, CPU), the training recipe stays the default plus ``extra``."""
    out = [
        "run_dir=unused",
        "threads=1",
        "eval_every=0",
        "checkpoint_every=0",
        "eval_archs=[max]",
        "logger.progress=off",
        "device=cpu",
    ]
    if steps is not None:
        out.append(f"steps={steps}")
    return compose_train(out + list(extra))


def for_run(cfg, seed: int, run_dir: str):
    """``cfg`` for one training run: its seed and run dir."""
    return dataclasses.replace(cfg, seed=seed, run_dir=run_dir)


# -- architectures -------------------------------------------------------------------------
def candidate_pool(space, n: int, seed: int) -> List[dict]:
    """Seeded random archs; each draws a different subset of elastic dimensions, so the pool
    reaches from near the smallest to near the largest subnet (uniform draws cluster mid-range)."""
    from dtrain.train.seeds import rng_for

    rng = rng_for(seed, "quality-archs")
    subsets = [s for r in range(1, len(space.dims) + 1) for s in itertools.combinations(space.dims, r)]
    return [space.min(), space.max()] + [space.sample(rng, subsets[i % len(subsets)]) for i in range(n)]


def pick_archs(model, positions, n_candidates: int = CANDIDATES, seed: int = 0) -> List[dict]:
    """One arch per (fraction, label): the candidate whose MACs are closest to
    min + fraction * (max - min); ties go to the earlier candidate."""
    pool = candidate_pool(model.space, n_candidates, seed)
    macs = [model.cost(a)["macs"] for a in pool]
    lo, hi = model.cost(model.space.min())["macs"], model.cost(model.space.max())["macs"]
    out = []
    for frac, label in positions:
        goal = lo + frac * (hi - lo)
        i = min(range(len(pool)), key=lambda j: (abs(macs[j] - goal), j))
        out.append({"label": label, "arch": pool[i], **model.cost(pool[i])})
    return out


# -- evaluation ----------------------------------------------------------------------------
def input_prep(resolution: int):
    """The static net's input: the batch resized as the supernet's ``adapt_input`` does."""
    import torch

    from dtrain.supernet.mbv3_net import resize

    return lambda x: resize(x, resolution).contiguous(memory_format=torch.channels_last)


def evaluate_static(net, arch: dict, split, batch_size: int, device) -> dict:
    from dtrain.train.evaluate import evaluate_split

    return evaluate_split(net, split, batch_size, device, "classification", prepare=input_prep(arch["resolution"]))


def evaluate_subnet(trainer, arch: dict) -> Dict[str, float]:
    """Val / test accuracy of ``arch`` in the trained supernet after BN recalibration, and
    the test accuracy of the static network extracted right after that calibration."""
    from dtrain.supernet.calibrate import preserved_bn_state
    from dtrain.train.evaluate import evaluate_arch

    m, c, dev = trainer.model, trainer.cfg, trainer.ctx.device
    val = evaluate_arch(m, arch, trainer.data.val, trainer.calib, c.eval_batch_size, dev, m.task)
    with preserved_bn_state(m):
        test = evaluate_arch(m, arch, trainer.data.test, trainer.calib, c.eval_batch_size, dev, m.task, keep_bn=False)
        static = m.extract(arch).eval()
        extracted = evaluate_static(static, arch, trainer.data.test, c.eval_batch_size, dev)
    return {"val": 100 * val["acc"], "test": 100 * test["acc"], "extracted_test": 100 * extracted["acc"]}


# -- training jobs (each runs in its own process with --jobs > 1) ------------------------------
def train_supernet(job: dict) -> dict:
    """Train one supernet variant with dtrain's Trainer, then evaluate the chosen archs."""
    from dtrain.train.loop import Trainer

    trainer = Trainer(job["cfg"])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's own results table
            summary = trainer.run()
        if not summary.get("finished"):
            raise RuntimeError(f"{job['name']}: training stopped at step {summary.get('step')}")
        accs = {a["label"]: evaluate_subnet(trainer, a["arch"]) for a in job["archs"]}
    finally:
        trainer.close()
    return {"accs": accs, "steps": trainer.step}


def train_standalone(job: dict) -> dict:
    """Train one static network of ``job['arch']`` from scratch, as the sandwich trains its
    largest subnet (hard labels with label smoothing, dropout, the same optimizer, LR
    schedule, clipping and batch order), then evaluate it."""
    import torch

    from dtrain.data import build_data
    from dtrain.supernet import build_supernet
    from dtrain.train.distributed import pick_device
    from dtrain.train.losses import hard_loss
    from dtrain.train.lr_schedule import WarmupCosine
    from dtrain.train.optim import build_optimizer
    from dtrain.train.sampler import BatchSampler
    from dtrain.train.seeds import derive_seed

    c = job["cfg"]
    arch, dev = job["arch"], pick_device(c.device, 0)
    torch.manual_seed(derive_seed(c.seed, "init"))  # the Trainer's init seed
    net = build_supernet(c.model).extract(arch).to(dev).train()
    data = build_data(c.data, None)
    opt = build_optimizer(net, c.optim)
    sched = WarmupCosine(opt, c.optim.lr, c.optim.warmup_steps, c.steps, c.optim.min_lr_ratio)
    sampler = BatchSampler(len(data.train), c.batch_size, derive_seed(c.seed, "data", c.peer_id))
    prep = input_prep(arch["resolution"])
    for step in range(c.steps):
        x, y = data.train.batch(sampler.next())
        torch.manual_seed(derive_seed(c.seed, "dropout", step, c.peer_id, 0))
        loss = hard_loss(net(prep(x.to(dev))), y.to(dev), c.sandwich.label_smoothing)
        loss.backward()
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), c.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    val = evaluate_static(net, arch, data.val, c.eval_batch_size, dev)
    test = evaluate_static(net, arch, data.test, c.eval_batch_size, dev)
    return {"accs": {job["label"]: {"val": 100 * val["acc"], "test": 100 * test["acc"]}}, "steps": c.steps}


def run_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    out = (train_supernet if job["kind"] == "supernet" else train_standalone)(job)
    return {**job, **out, "seconds": time.time() - t0}


def run_all(jobs: List[dict], n_procs: int) -> List[dict]:
    """Every job, in-process when ``n_procs`` is 1, else in a pool of spawned processes."""
    done = []
    if n_procs <= 1:
        for job in jobs:
            done.append(run_job(job))
            _report(done[-1], len(done), len(jobs))
        return done
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(n_procs, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(run_job, jobs):
            done.append(res)
            _report(res, len(done), len(jobs))
    return done


def _report(res: dict, i: int, n: int) -> None:
    accs = " ".join(f"{k}={v['test']:.2f}" for k, v in res["accs"].items())
    print(f"  [{i}/{n}] {res['name']} seed {res['seed']}: {accs} ({res['seconds']:.0f}s)", flush=True)


def plan_jobs(archs: List[dict], configs: Dict[str, object], seeds: int, work: str) -> List[dict]:
    """Supernets first (the longest jobs), then the standalone twins (default config)."""
    jobs = []
    for seed in range(seeds):
        for name, _ in VARIANTS:
            cfg = for_run(configs[name], seed, os.path.join(work, f"{name}_s{seed}"))
            jobs.append({"kind": "supernet", "variant": name, "name": name, "seed": seed, "archs": archs, "cfg": cfg})
    for seed in range(seeds):
        for arch in archs:
            cfg = for_run(configs["supernet"], seed, os.path.join(work, f"standalone_{arch['label']}_s{seed}"))
            jobs.append(
                {
                    "kind": "standalone",
                    "variant": "standalone",
                    "name": f"standalone {arch['label']}",
                    "seed": seed,
                    "label": arch["label"],
                    "arch": arch["arch"],
                    "cfg": cfg,
                }
            )
    return jobs


# -- report ----------------------------------------------------------------------------------
def mean_accs(results: List[dict], variant: str, label: str) -> Dict[str, float]:
    """Accuracies of one (variant, arch) averaged over seeds."""
    runs = [r["accs"][label] for r in results if r["variant"] == variant and label in r["accs"]]
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def build_rows(archs: List[dict], results: List[dict]) -> List[dict]:
    rows = []
    for a in archs:
        sup, alone = mean_accs(results, "supernet", a["label"]), mean_accs(results, "standalone", a["label"])
        nod, dly = mean_accs(results, "no-distill", a["label"]), mean_accs(results, "delayed", a["label"])
        rows.append(
            {
                "arch": a["label"],
                "macs": a["macs"],
                "params": a["params"],
                "arch_spec": a["arch"],
                "supernet_test_acc": sup["test"],
                "standalone_test_acc": alone["test"],
                "gap_pts": alone["test"] - sup["test"],
                "no_distill_test_acc": nod["test"],
                "delayed_test_acc": dly["test"],
                "supernet_val_acc": sup["val"],
                "standalone_val_acc": alone["val"],
                "no_distill_val_acc": nod["val"],
                "delayed_val_acc": dly["val"],
                "extracted_test_acc": sup["extracted_test"],
            }
        )
    return rows


def build_targets(rows: List[dict]) -> List[dict]:
    out = [target(f"gap_{r['arch']}_pts", r["gap_pts"], GAP_TARGET) for r in rows]
    out.append(target(f"max_gap_all{len(rows)}_pts", max(r["gap_pts"] for r in rows), GAP_TARGET))
    return out


def results_table(rows: List[dict], title: str) -> str:
    def m(v):
        return f"{v / 1e6:.2f}M"

    def k(v):
        return f"{v / 1e3:.0f}k"

    return format_table(
        ["arch", "MACs", "params", "supernet %", "standalone %", "gap pts", "no-distill %", "delayed %"],
        [
            [
                r["arch"],
                m(r["macs"]),
                k(r["params"]),
                r["supernet_test_acc"],
                r["standalone_test_acc"],
                r["gap_pts"],
                r["no_distill_test_acc"],
                r["delayed_test_acc"],
            ]
            for r in rows
        ],
        title,
    )


def targets_table(targets: List[dict]) -> str:
    return format_table(
        ["target", "value", "wanted", "met"],
        [[t["name"], t["value"], t["target"], "yes" if t["met"] else "NO"] for t in targets],
    )


def extract_mismatch(rows: List[dict]) -> float:
    """Largest |supernet - extracted static net| test accuracy difference (points)."""
    return max(abs(r["supernet_test_acc"] - r["extracted_test_acc"]) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=None, help="default: conf/train.yaml's steps")
    p.add_argument("--seeds", type=positive_int, default=1, help="average over seeds 0..N-1")
    p.add_argument("--jobs", type=positive_int, default=1, help="training processes at once (1 thread each)")
    p.add_argument("--out", default="", help="keep the run dirs here (default: a temporary dir)")
    p.add_argument("--json", default="")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK['steps']} steps, batch 16, the smallest and largest arch only",
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    quick_extra = QUICK["overrides"] if a.quick else []
    if a.quick and a.steps is None:
        a.steps = QUICK["steps"]
    configs = {name: variant_config(a.steps, quick_extra + extra) for name, extra in VARIANTS}
    base = configs["supernet"]
    from dtrain.supernet import build_supernet

    archs = pick_archs(
        build_supernet(base.model), QUICK_POSITIONS if a.quick else POSITIONS, 200 if a.quick else CANDIDATES
    )
    t0 = time.time()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    with contextlib.nullcontext(a.out) if a.out else tempfile.TemporaryDirectory(prefix="dtrain-quality-") as work:
        results = run_all(plan_jobs(archs, configs, a.seeds, work), a.jobs)
    seconds = time.time() - t0
    rows = build_rows(archs, results)
    targets = build_targets(rows)
    model = "--quick two-stage mbv3" if a.quick else "mbv3_tiny"
    title = (
        f"digits, {model} supernet vs standalone twins: {base.steps} steps x batch "
        f"{base.batch_size}, {a.seeds} seed(s); test accuracy % (supernet subnets after BN recalibration), "
        f"gap = standalone - supernet"
    )
    print(results_table(rows, title))
    print()
    print(targets_table(targets))
    mismatch = extract_mismatch(rows)
    print(
        f"extracted static subnets vs the recalibrated supernet: max |diff| {mismatch:.2f} pts"
        f"{'' if mismatch == 0 else '  (expected 0: extraction or calibration disagrees)'}"
    )
    missed = [t["name"] for t in targets if not t["met"]]
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")
    print(f"{len(results)} training runs in {seconds:.0f}s with {a.jobs} process(es)")
    if a.json:
        runs = [{"name": r["name"], "seed": r["seed"], "seconds": r["seconds"], "steps": r["steps"]} for r in results]
        write_json(
            a.json,
            rows,
            targets,
            settings={**vars(a), "steps": base.steps, "batch_size": base.batch_size},
            runs=runs,
            extract_mismatch_pts=mismatch,
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
