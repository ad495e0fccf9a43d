"""Progress bars for long loops: description, bar, done/total, items per second and ETA (rich).

Bars go to stderr and switch themselves off when stderr is not a terminal (CI logs, DVC captured output)
unless KDPIPE_PROGRESS=1; the one-line summary at the end is always printed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console = Console(stderr=True, soft_wrap=True)  # never wrap a status line inside a path


class _RateColumn(ProgressColumn):
    """Items per second with the unit, e.g. '812.4 img/s'."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


def _enabled() -> bool:
    flag = os.environ.get("KDPIPE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


class Bar:
    """Handle returned by `progress`: call `advance(n)`; `summary` is printed when the block ends."""

    def __init__(self, progress: Progress | None, task_id, unit: str) -> None:
        self._progress, self._task, self.unit = progress, task_id, unit
        self.done = 0
        self.postfix = ""

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, postfix=self.postfix)


@contextmanager
def progress(description: str, total: int | None, unit: str = "it") -> Iterator[Bar]:
    """A progress bar over `total` items; ends with one summary line: '<desc>: N unit in T s (R unit/s)'."""
    start = time.perf_counter()
    if _enabled():
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[postfix]}"),
        ]
        with Progress(*columns, console=_console, transient=False) as prog:
            bar = Bar(prog, prog.add_task(description, total=total, postfix=""), unit)
            yield bar
    else:
        bar = Bar(None, None, unit)
        yield bar
    elapsed = time.perf_counter() - start
    rate = bar.done / elapsed if elapsed > 0 else float("inf")
    _console.print(
        f"{description}: {bar.done:,} {unit} in {elapsed:.1f} s ({rate:,.1f} {unit}/s)", highlight=False, markup=False
    )


def info(message: str) -> None:
    """One status line on stderr (kept off stdout so that stdout stays machine-readable)."""
    _console.print(message, highlight=False, markup=False)  # a path with [brackets] stays as it is
