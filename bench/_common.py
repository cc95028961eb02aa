"""Shared helpers of the benchmarks in ``bench/``: interleaved timing, plain-text
tables, target checks and the ``--json PATH`` report.

Timing runs every variant once per round, round-robin, so that machine noise
(other processes, frequency changes) lands on all variants alike; a variant's
result is the median over the measured rounds, after a few warm-up rounds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence


def _int_at_least(text: str, low: int, why: str = "") -> int:
    try:
        v = int(text)
    except ValueError:
        raise _arg_error(f"expected an integer >= {low}, got {text!r}") from None
    if v < low:
        raise _arg_error(f"expected an integer >= {low}{why}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise _arg_error(f"expected a number > 0, got {text!r}") from None
    if not v > 0:
        raise _arg_error(f"expected a number > 0, got {text!r}")
    return v


def member_count(text: str) -> int:
    """argparse type: how many members a collective has, an integer >= 2."""
    return _int_at_least(text, 2, " (a collective needs two members)")


def _arg_error(msg: str):
    import argparse

    return argparse.ArgumentTypeError(msg)


def time_round_robin(
    steps: Dict[str, Callable[[], None]], warmup: int, repeats: int, groups: Optional[Dict[str, Sequence[str]]] = None
) -> Dict[str, List[float]]:
    """Seconds per call of every step: ``warmup`` untimed rounds, then ``repeats``
    timed rounds; each round calls every step once, in the given order.

    ``groups`` maps a new name to member steps; its time per round is the sum of
    its members' times in that round (e.g. several steps that together stand
    against one other step).
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    for gname, members in (groups or {}).items():
        times[gname] = [sum(vals) for vals in zip(*(times[m] for m in members))]
    return times


def summary(samples: Sequence[float]) -> Dict[str, float]:
    """Median, min and max of a list of timings (NaN when empty)."""
    if not samples:
        nan = float("nan")
        return {"median_s": nan, "min_s": nan, "max_s": nan, "n": 0}
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "n": len(samples)}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is zero."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return float("nan")
    return a / b


def target(name: str, value: float, bound: str) -> dict:
    """A target entry; ``bound`` is ``"<= X"`` or ``">= X"``. NaN never meets it."""
    op, _, num = bound.strip().partition(" ")
    limit = float(num)
    if op == "<=":
        met = math.isfinite(value) and value <= limit
    elif op == ">=":
        met = math.isfinite(value) and value >= limit
    else:
        raise ValueError(f"unknown target operator in {bound!r}")
    return {"name": name, "value": float(value), "target": bound, "met": bool(met)}


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    if v is None:
        return ""
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    """A fixed-width text table; numbers right-aligned, text left-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_num(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]
    out = [title] if title else []
    out.append(" | ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    out.append("-+-".join("-" * w for w in widths))
    for r in cells:
        out.append(" | ".join((c.rjust(w) if num else c.ljust(w)) for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(out)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def write_json(path: str, rows: List[dict], targets: List[dict], **extra) -> None:
    """Write ``{"rows": rows, "targets": targets, **extra}``. NaN is written as
    JSON's non-standard ``NaN`` (Python's json reads it back)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "targets": targets, **extra}, f, indent=2)
        f.write("\n")
