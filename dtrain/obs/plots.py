"""The report's figures, drawn with matplotlib's Agg renderer (no display, no pyplot state).

Each ``plot_*(run, path, dpi)`` writes one PNG and returns None, or returns
the reason it wrote nothing (the run has no data for that figure): an empty
PNG is never written. ``PLOTS`` lists them in report order.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from . import run_series as S
from .run_reader import Run

SUBNETS = (("max", "largest (max)"), ("min", "smallest (min)"), ("random", "random (mean)"))
EVENT_COLORS = {
    "kill": "tab:red",
    "join": "tab:green",
    "restart": "tab:olive",
    "coordinator_restart": "tab:purple",
    "cluster_restart": "black",
    "link_reset": "tab:orange",
    "link_stall": "tab:brown",
    "slowdown": "tab:pink",
}
MAX_EVENT_LABELS = 12  # more chaos events than this: colours and a legend only, no text per line


def _subplots(*grid, figsize, **kw):
    """(figure, axes) of a Figure drawn by the Agg canvas: the process's pyplot backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*grid, **kw)


def _cmap(name: str = "tab10"):
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig, path: str, dpi: int) -> None:
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)


def _log_y(ax, values: List[float]) -> None:
    """Log-scaled y when the values are positive and span more than a decade, with plain tick labels
    (0.01, 0.1, 1; mathtext labels are slow to lay out)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    if not values or min(values) <= 0 or max(values) < 10 * min(values):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _peer_colors(peers: List[str]) -> dict:
    cmap = _cmap()
    return {p: cmap(i % 10) for i, p in enumerate(sorted(peers))}


def plot_loss(run: Run, path: str, dpi: int) -> Optional[str]:
    series = S.loss_series(run)
    if not series:
        return "no step records with losses"
    if run.kind == "single":
        fig, ax = _subplots(figsize=(7, 4))
        groups = next(iter(series.values()))
        for name, label in SUBNETS:
            if name in groups:
                xs, ys = zip(*groups[name])
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        _log_y(ax, [v for pts in groups.values() for _, v in pts])
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title("loss of the sandwich's subnets")
    else:
        present = [(n, label) for n, label in SUBNETS if any(n in g for g in series.values())]
        colors = _peer_colors(list(series))
        fig, axes = _subplots(1, len(present), figsize=(4.2 * len(present), 4), sharex=True, squeeze=False)
        for ax, (name, label) in zip(axes[0], present):
            for peer, groups in sorted(series.items()):
                if name in groups:
                    xs, ys = zip(*groups[name])
                    ax.plot(xs, ys, label=peer, color=colors[peer], lw=1.2)
            ax.set_title(label)
            ax.set_xlabel("step")
            _log_y(ax, [v for g in series.values() for _, v in g.get(name, [])])
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("training loss")
        axes[0][-1].legend(title="peer", fontsize=8)
        fig.suptitle("loss of the sandwich's subnets, one line per peer")
    _save(fig, path, dpi)
    return None


def plot_accuracy(run: Run, path: str, dpi: int) -> Optional[str]:
    metric, axis, series = S.eval_series(run)
    if not series:
        return "no evaluation records (eval_every=0 and no finished peer)"
    fig, ax = _subplots(figsize=(7, 4))
    archs = sorted({a for _, _, a in series}, key=lambda a: (a not in ("max", "min"), a))
    cmap = _cmap()
    color = {a: cmap(i % 10) for i, a in enumerate(archs)}
    several = len({p for p, _, _ in series}) > 1
    labelled = set()
    for (_peer, split, arch), pts in sorted(series.items()):
        xs, ys = zip(*pts)
        if metric == "acc":
            ys = [100 * y for y in ys]
        label = f"{arch} ({split})"
        ax.plot(
            xs,
            ys,
            color=color[arch],
            ls="-" if split == "val" else "--",
            marker="o" if split == "val" else "s",
            ms=4,
            alpha=0.6 if several else 1.0,
            label=None if label in labelled else label,
        )
        labelled.add(label)
    ax.set_xlabel(axis)
    ax.set_xlim(left=0, right=max(x for pts in series.values() for x, _ in pts) * 1.05 + 0.5)
    if axis == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)" if metric == "acc" else "bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        ("accuracy" if metric == "acc" else "bits per byte")
        + f" over {axis}s"
        + (" (one line per peer)" if several else "")
    )
    _save(fig, path, dpi)
    return None


def plot_membership(run: Run, path: str, dpi: int) -> Optional[str]:
    m = S.membership(run)
    if not m["live"] and not m["quorum"] and not m["members"]:
        return "no membership data (no simulation events and no committed rounds)"
    events = m["events"]
    kinds = sorted({k for _, k, _ in events}, key=lambda k: list(EVENT_COLORS).index(k) if k in EVENT_COLORS else 99)
    if events:
        fig, (ax, strip) = _subplots(
            2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [4, 0.4 + 0.35 * len(kinds)]}
        )
    else:
        fig, ax = _subplots(figsize=(9, 4))
    if m["live"]:
        xs, ys = zip(*m["live"])
        ax.step(xs, ys, where="post", label="peer processes running", color="tab:blue")
    if m["members"]:
        xs, ys = zip(*m["members"])
        ax.step(xs, ys, where="post", label="coordinator members", color="tab:cyan", ls="--")
    if m["quorum"]:
        xs, ys = zip(*m["quorum"])
        ax.plot(xs, ys, "o", ms=4, label="quorum size at commit", color="tab:orange")
    top = max([y for _, y in m["live"] + m["members"] + m["quorum"]] + [1])
    few = len(events) <= MAX_EVENT_LABELS
    for t, kind, label in events if few else []:
        ax.axvline(t, color=EVENT_COLORS.get(kind, "gray"), ls=":", lw=1)
        ax.text(t, top + 0.3, label, rotation=90, va="bottom", ha="right", fontsize=7)
    ax.set_ylim(0, top + (2.6 if events and few else 1))
    ax.set_ylabel("peers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("membership over time" + (" and chaos events" if events else ""))
    if events:
        for i, kind in enumerate(kinds):
            ts = [t for t, k, _ in events if k == kind]
            strip.plot(ts, [i] * len(ts), "|", ms=10, mew=1.5, color=EVENT_COLORS.get(kind, "gray"))
        strip.set_yticks(
            range(len(kinds)),
            [f"{k.replace('_', ' ')} ({sum(1 for e in events if e[1] == k)})" for k in kinds],
            fontsize=8,
        )
        strip.set_ylim(-0.6, len(kinds) - 0.4)
        strip.grid(alpha=0.3, axis="x")
        strip.set_xlabel("seconds since the run started")
    else:
        ax.set_xlabel("seconds since the run started")
    _save(fig, path, dpi)
    return None


def plot_bytes(run: Run, path: str, dpi: int) -> Optional[str]:
    outer, heals = S.bytes_per_round(run)
    if not outer and not heals:
        return "no committed rounds (not a DiLoCo run)"
    fig, ax = _subplots(figsize=(8, 4))
    rounds = sorted({r for d in outer.values() for r in d} | set(heals))
    bottom = {r: 0.0 for r in rounds}
    colors = _peer_colors(list(outer))
    for peer in sorted(outer):
        ys = [outer[peer].get(r, 0) / 2**20 for r in rounds]
        ax.bar(rounds, ys, bottom=[bottom[r] for r in rounds], color=colors[peer], label=peer)
        for r, y in zip(rounds, ys):
            bottom[r] += y
    if heals:
        ys = [heals.get(r, 0) / 2**20 for r in rounds]
        ax.bar(
            rounds,
            ys,
            bottom=[bottom[r] for r in rounds],
            color="lightgray",
            hatch="//",
            edgecolor="gray",
            label="state transfer (heals)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title="sent + received by" if len(outer) > 1 else None)
    ax.set_title("bytes per round (outer exchange per peer, sent + received)")
    _save(fig, path, dpi)
    return None


def plot_round_time(run: Run, path: str, dpi: int) -> Optional[str]:
    """Top: the mean round time split into compute / comm / wait / other. Below it, when the round records
    carry per-peer steps: the inner steps each peer trained into each round (one line per peer; a slower
    peer under ``outer.local_steps=balanced`` trains fewer), with the rounds chaos slowdowns hit marked."""
    rows = S.round_time_split(run)
    if not rows:
        return "no committed rounds with timings (not a DiLoCo run)"
    steps = S.steps_per_round(run)
    if steps:
        fig, (ax, sax) = _subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        fig, ax = _subplots(figsize=(8, 4))
        sax = None
    rounds = [r[0] for r in rows]
    bottom = [0.0] * len(rows)
    for i, (name, color) in enumerate(
        (("compute", "tab:green"), ("comm", "tab:blue"), ("wait", "tab:red"), ("other", "lightgray")), start=1
    ):
        ys = [r[i] for r in rows]
        if not any(ys):
            continue
        ax.bar(rounds, ys, bottom=bottom, color=color, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    several = len(S.round_records(run)) > 1
    ax.set_title("round time: compute / comm / wait" + (" (mean over peers)" if several else ""))
    if sax is None:
        ax.set_xlabel("round")
    else:
        from matplotlib.ticker import MaxNLocator

        colors = _peer_colors(list(steps))
        for peer, pts in sorted(steps.items()):
            xs, ys = zip(*pts)
            sax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colors[peer], label=peer, drawstyle="steps-mid")
        for ev in run.events:
            if ev.get("event") == "slowdown" and isinstance(ev.get("committed_round"), int):
                label = f"slowdown {ev.get('peer', '')}"
                sax.axvline(ev["committed_round"], color=EVENT_COLORS["slowdown"], ls=":", lw=1.2)
                sax.text(ev["committed_round"], 0, label, rotation=90, va="bottom", ha="right", fontsize=7)
        sax.set_ylim(bottom=0)
        sax.yaxis.set_major_locator(MaxNLocator(integer=True))
        sax.set_xlabel("round")
        sax.set_ylabel("inner steps")
        sax.grid(alpha=0.3)
        sax.legend(fontsize=8, title="peer", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        sax.set_title("inner steps each peer trained into the round")
    _save(fig, path, dpi)
    return None


PLOTS: List[Tuple[str, str, Callable[[Run, str, int], Optional[str]]]] = [
    ("loss.png", "Loss of the largest, smallest and random subnets", plot_loss),
    ("accuracy.png", "Accuracy", plot_accuracy),
    ("membership.png", "Membership and chaos events", plot_membership),
    ("bytes.png", "Bytes per round", plot_bytes),
    ("round_time.png", "Round time (compute, communication, waiting) and steps per peer", plot_round_time),
]
