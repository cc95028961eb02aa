"""Progress bar on the leader when attached to a terminal (rich)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, mode: str = "auto", enabled: bool = True, start: int = 0):
        show = enabled and (mode == "on" or (mode == "auto" and sys.stdout.isatty()))
        self._bar = None
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
