"""Benchmark: seconds per training step of dtrain's MobileNetV3 supernet, side by side.

One run measures, on the same batch and input resolution (forward + backward +
optimizer step, model in train mode, the same AdamW from
``dtrain.train.optim.build_optimizer`` for every variant):

  (a) the dtrain supernet with its largest arch active (input via ``adapt_input``),
  (b) the static network ``extract``-ed for that arch (plain torch layers),
  (c) the ``ofa`` package's ``OFAMobileNetV3`` at the same arch, NCHW and channels-last,
  (d) one sandwich step (``sandwich_backward`` over max, min and two random archs,
      then one optimizer step) against four single-subnet steps over those archs.

Variants are interleaved round-robin after warm-up rounds; each reports the
median. Targets: (a)/(b) <= 1.15, (a)/best(c) <= 1.0, sandwich/sum(d) <= 1.05.
A missed target is reported (``met: false``), the exit status stays 0.

    python bench/supernet_step.py [--resolution 64] [--batch 8] [--repeats 15] [--warmup 3]
                                  [--classes 10] [--threads N] [--json out.json]

The model is the full Once-for-All space of ``conf/model/mbv3.yaml`` with
``num_classes``/``resolutions`` from the flags and dropout 0 (the ofa network
is built with dropout 0 too, so every variant computes the same function).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    format_table,
    positive_int,
    ratio,
    summary,
    target,
    time_round_robin,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e``
    sys.path.insert(1, str(ROOT))

CL = torch.channels_last
KS, ER, DEPTHS = [3, 5, 7], [3, 4, 6], [2, 3, 4]


# --------------------------------------------------------------------------- setup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=positive_int, default=64, help="input size in pixels (64)")
    p.add_argument("--batch", type=positive_int, default=8, help="samples per step (8)")
    p.add_argument("--repeats", type=positive_int, default=15, help="timed rounds (15)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed rounds first (3)")
    p.add_argument("--classes", type=int, default=10, help="number of classes, >= 2 (10)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> None:
    """Argument combinations the step cannot run with: one argparse error line each."""
    if args.classes < 2:
        p.error(f"argument --classes: expected an integer >= 2, got {args.classes}")
    side = args.resolution  # smallest feature map: batch norm needs > 1 value per channel
    for stride in [cfg.stem_stride] + [s.stride for s in cfg.stages]:
        side = (side - 1) // stride + 1
    if args.batch * side * side < 2:
        p.error(
            f"argument --batch/--resolution: batch {args.batch} at {args.resolution} px leaves "
            f"a 1x1 feature map for batch norm; use --batch >= 2 or a larger --resolution"
        )
    if args.json:
        parent = Path(args.json).resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"argument --json: cannot create directory {parent}: {e.strerror}")
        if not os.access(parent, os.W_OK):
            p.error(f"argument --json: directory {parent} is not writable")


def model_config(resolution: int, classes: int):
    """conf/model/mbv3.yaml as an MBV3Config, with our classes, resolution and no dropout."""
    from omegaconf import OmegaConf

    from dtrain.config import model_config_from

    d = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "mbv3.yaml"))
    d.pop("defaults", None)  # Hydra's composition list, not a model key
    d.update(num_classes=classes, resolutions=[resolution], dropout=0.0)
    return model_config_from(d)


def import_ofa():
    """``OFAMobileNetV3`` from the ``ofa`` package, with stand-ins for torchvision.

    torchvision cannot be installed beside this torch; ofa's import only needs
    ``transforms.RandomResizedCrop`` to exist as a class (its own dataloader
    subclasses it). The stand-ins are only registered if torchvision is absent.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        trf = types.ModuleType("torchvision.transforms.functional")
        ds = types.ModuleType("torchvision.datasets")

        class RandomResizedCrop:  # subclassed by ofa.utils.my_dataloader at import
            pass

        tr.RandomResizedCrop = RandomResizedCrop
        tr.functional = trf
        tv.transforms, tv.datasets = tr, ds
        for name, mod in (
            ("torchvision", tv),
            ("torchvision.transforms", tr),
            ("torchvision.transforms.functional", trf),
            ("torchvision.datasets", ds),
        ):
            sys.modules[name] = mod
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    return OFAMobileNetV3


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- steps


def make_step(model, opt, x, y, prepare):
    """One training step of ``model`` on (x, y): prepare input, forward, CE, backward, step."""

    def step():
        loss = F.cross_entropy(model(prepare(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_single_step(net, opt, arch, x, y):
    """Single-subnet step of the supernet: set_active, adapt_input, forward, CE, backward, step."""

    def step():
        net.set_active(arch)
        loss = F.cross_entropy(net(net.adapt_input(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_sandwich_step(net, opt, archs, x, y, cfg):
    from dtrain.train.sandwich import sandwich_backward

    def step():
        sandwich_backward(net, [(x, y)], archs, 1.0, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = model_config(args.resolution, max(args.classes, 2))
    check_args(parser, args, cfg)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from dtrain.config import OptimConfig, SandwichConfig
    from dtrain.supernet import build_supernet
    from dtrain.train.optim import build_optimizer

    optim_cfg = OptimConfig()
    notes = []

    def new_supernet():
        torch.manual_seed(0)  # every supernet instance starts from the same weights
        net = build_supernet(cfg)
        net.train()
        return net

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, args.resolution, args.resolution, generator=gen)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen)

    steps, info = {}, {}

    # (a) supernet, largest arch
    net_a = new_supernet()
    space = net_a.space
    net_a.set_active(space.max())
    opt_a = build_optimizer(net_a, optim_cfg)
    steps["a_supernet"] = make_step(net_a, opt_a, x, y, net_a.adapt_input)
    info["a_supernet"] = ("(a) dtrain supernet, max arch (channels-last)", n_params(net_a))

    # (b) the extracted static network
    static = net_a.extract(space.max())
    static.train()
    opt_b = build_optimizer(static, optim_cfg)
    steps["b_static"] = make_step(static, opt_b, x, y, lambda t: t.contiguous(memory_format=CL))
    info["b_static"] = ("(b) extracted static net (channels-last)", n_params(static))

    # (c) ofa's OFAMobileNetV3 at the same arch, in both memory formats
    ofa_error = None
    try:
        OFAMobileNetV3 = import_ofa()
        for fmt_name, mf in (("nchw", torch.contiguous_format), ("cl", CL)):
            torch.manual_seed(0)
            ofa = OFAMobileNetV3(
                n_classes=args.classes,
                dropout_rate=0.0,
                width_mult=1.0,
                ks_list=list(KS),
                expand_ratio_list=list(ER),
                depth_list=list(DEPTHS),
            )
            ofa.set_max_net()
            ofa.train()
            ofa.to(memory_format=mf)
            opt_c = build_optimizer(ofa, optim_cfg)
            key = f"c_ofa_{fmt_name}"
            steps[key] = make_step(
                ofa,
                opt_c,
                x,
                y,
                (lambda t: t) if mf is torch.contiguous_format else (lambda t: t.contiguous(memory_format=CL)),
            )
            steps[key]()  # one trial step here, so that a failing ofa is reported, not fatal
            label = "NCHW" if fmt_name == "nchw" else "channels-last"
            info[key] = (f"(c) ofa OFAMobileNetV3, max net ({label})", n_params(ofa))
    except Exception as e:  # ofa missing or broken: report, do not crash
        ofa_error = f"{type(e).__name__}: {e}"
        notes.append(f"ofa could not run, its target is not met (value NaN): {ofa_error}")
        for k in [k for k in steps if k.startswith("c_ofa")]:
            del steps[k], info[k]

    if ofa_error is None:
        pa, pc = info["a_supernet"][1], info["c_ofa_nchw"][1]
        if pa == pc:
            notes.append(f"parameter count: dtrain supernet {pa:,} == ofa {pc:,}")
        else:
            notes.append(
                f"parameter count differs: dtrain supernet {pa:,} vs ofa {pc:,}; the "
                f"two differ in stage, SE or head layout, so (c) is not the same network"
            )
    pa, pb = info["a_supernet"][1], info["b_static"][1]
    pt = sum(p.numel() for n, p in net_a.named_parameters() if ".transforms." in n)
    if pa - pb == pt:
        notes.append(
            f"the static net has {pb:,} parameters: the supernet's {pt:,} kernel-transform "
            f"parameters are unused at kernel 7 and not extracted"
        )
    else:
        notes.append(f"parameter count: supernet {pa:,}, static {pb:,} (kernel transforms {pt:,})")

    # (d) sandwich vs four single-subnet steps over the same archs
    archs = [
        ("max", space.max()),
        ("min", space.min()),
        ("rand0", space.sample(random.Random(0))),
        ("rand1", space.sample(random.Random(1))),
    ]
    net_s = new_supernet()
    opt_s = build_optimizer(net_s, optim_cfg)
    steps["d_sandwich"] = make_sandwich_step(net_s, opt_s, archs, x, y, SandwichConfig())
    info["d_sandwich"] = ("(d) sandwich: max+min+2 random, 1 optimizer step", n_params(net_s))
    net_1 = new_supernet()
    opt_1 = build_optimizer(net_1, optim_cfg)
    singles = []
    for name, arch in archs:
        key = f"d_single_{name}"
        steps[key] = make_single_step(net_1, opt_1, arch, x, y)
        info[key] = (f"(d) single-subnet step, {name} arch", n_params(net_1))
        singles.append(key)
    info["d_sum_of_singles"] = ("(d) sum of the four single steps", n_params(net_1))

    print(
        f"supernet_step: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, resolution {args.resolution}, classes {args.classes}, "
        f"warm-up {args.warmup}, repeats {args.repeats} (round-robin over {len(steps)} steps)",
        flush=True,
    )
    times = time_round_robin(steps, args.warmup, args.repeats, groups={"d_sum_of_singles": singles})

    stats = {k: summary(v) for k, v in times.items()}
    med = {k: s["median_s"] for k, s in stats.items()}
    a = med["a_supernet"]
    rows = []
    for key in info:
        s = stats[key]
        rows.append(
            {
                "variant": key,
                "description": info[key][0],
                "params": info[key][1],
                "median_s": s["median_s"],
                "min_s": s["min_s"],
                "max_s": s["max_s"],
                "n": s["n"],
                "vs_a": ratio(s["median_s"], a),
            }
        )

    c_keys = [k for k in ("c_ofa_nchw", "c_ofa_cl") if k in med]
    c_best = min(c_keys, key=lambda k: med[k]) if c_keys else None
    targets = [
        target("supernet_vs_static", ratio(a, med["b_static"]), "<= 1.15"),
        target("supernet_vs_ofa", ratio(a, med[c_best]) if c_best else float("nan"), "<= 1.0"),
        target("sandwich_vs_sum", ratio(med["d_sandwich"], med["d_sum_of_singles"]), "<= 1.05"),
    ]
    if c_best:
        notes.append(f"supernet_vs_ofa uses the faster ofa layout: {c_best}")

    headers = ["variant", "description", "params", "median s/step", "min", "max", "vs (a)"]
    print(
        format_table(
            headers,
            [
                [r["variant"], r["description"], r["params"], r["median_s"], r["min_s"], r["max_s"], r["vs_a"]]
                for r in rows
            ],
        )
    )
    print()
    print(
        format_table(
            ["target", "value", "wanted", "met"], [[t["name"], t["value"], t["target"], t["met"]] for t in targets]
        )
    )
    for n in notes:
        print("note:", n)
    missed = [t["name"] for t in targets if not t["met"]]
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")

    if args.json:
        write_json(
            args.json,
            rows,
            targets,
            notes=notes,
            settings={
                "batch": args.batch,
                "resolution": args.resolution,
                "classes": args.classes,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "ofa_error": ofa_error,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
