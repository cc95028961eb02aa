"""Plain-text tables for terminals and logs (no colour codes, fixed widths)."""

from __future__ import annotations

from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "-|-".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out.append(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip())
    out.append(line)
    for r in cells:
        out.append(" | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4f}" if abs(c) < 1000 else f"{c:.4g}"
    if isinstance(c, int) and abs(c) >= 10000:
        return human(c)
    return str(c)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("kMGT%x"))
        return True
    except ValueError:
        return False


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
