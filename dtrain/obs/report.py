"""The report of a run directory: the PNG figures of ``plots`` and a ``report.md`` that embeds them.

    files = write_report("runs/sim-x")               # -> runs/sim-x/report/{loss,...}.png, report.md
    files = write_report(run_dir, out_dir, dpi=110)  # the paths written, report.md last

``report.md`` holds a title, the run's kind, a table of summary numbers
(steps, rounds committed, final accuracy of the largest / smallest subnet,
faults, recoveries and parity of a simulation, bytes moved, compute
utilisation; when the round records carry per-peer steps, each peer's mean
inner steps per round, compute utilisation and steps lost, as defined in
``run_series.peer_work``), then every figure with its caption, or a note
saying why the run has no data for it. Stale figures of an earlier report in
the same out_dir are removed.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..atomic_io import atomic_write_bytes
from .plots import PLOTS
from .run_reader import Run, load_run
from .run_series import summary_rows

CAPTIONS = {
    "round_time.png": (
        "Bars: the mean round time over the peers that recorded the round. Lines (when the rounds record "
        "per-peer steps): the inner steps each peer trained into the round; with "
        "`outer.local_steps=balanced` a slower peer trains fewer, so no round waits for it. Dotted: a "
        "`chaos.slowdown` (at the round committed when it hit)."
    ),
}


def render_plots(run: Run, out_dir: str, dpi: int) -> List[Tuple[str, str, Optional[str]]]:
    """[(file name, title, reason skipped or None)] after writing the figures into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    done = []
    for name, title, plot in PLOTS:
        path = os.path.join(out_dir, name)
        why = plot(run, path, dpi)
        if why is not None and os.path.exists(path):
            os.unlink(path)  # a figure of an earlier report this run no longer supports
        done.append((name, title, why))
    return done


def report_markdown(run: Run, plots: List[Tuple[str, str, Optional[str]]]) -> str:
    title = os.path.basename(run.dir.rstrip(os.sep)) or run.dir
    lines = [
        f"# dtrain report: {title}",
        "",
        f"Run directory: `{run.dir}` ({'dtrain-sim' if run.kind == 'sim' else 'dtrain-train'})",
        "",
        "| | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in summary_rows(run)]
    for name, title, why in plots:
        lines += ["", f"## {title}", ""]
        lines.append(f"_Not plotted: {why}._" if why else f"![{title}]({name})")
        if not why and name in CAPTIONS:
            lines += ["", CAPTIONS[name]]
    if run.torn_lines:
        lines += ["", "Torn lines of crashed writers, skipped: " + ", ".join(f"`{t}`" for t in run.torn_lines[:10])]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, out_dir: str = "", dpi: int = 110) -> List[str]:
    """Read run_dir, write the figures and report.md into out_dir (default run_dir/report); the files written."""
    run = load_run(run_dir)
    out = os.path.abspath(out_dir or os.path.join(run.dir, "report"))
    plots = render_plots(run, out, dpi)
    md = os.path.join(out, "report.md")
    atomic_write_bytes(md, report_markdown(run, plots).encode("utf-8"))
    return [os.path.join(out, name) for name, _, why in plots if why is None] + [md]
