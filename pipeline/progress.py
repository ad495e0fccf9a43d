"""Progress bars for long loops (description, bar, done/total, items per second, ETA; rich) and the
console handler through which the CLI shows the library's log records.

Bars go to stderr and switch themselves off when stderr is not a terminal (CI logs, DVC captured output)
unless KDPIPE_PROGRESS=1; the one-line summary at the end is logged (logger `pipeline.progress`, INFO).
The library only logs (`logging.getLogger(__name__)`); `configure_logging`, called by the CLI, shows the
records of the `pipeline` and `stages` loggers on stderr, on the same rich console as the bars, so that a
status line is printed above a live bar instead of tearing it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
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

from pipeline.printable import MESSAGE_LIMIT, printable

_console = Console(stderr=True, soft_wrap=True)  # never wrap a status line inside a path
log = logging.getLogger(__name__)
_HANDLER_NAME = "kdpipe-console"


class ConsoleHandler(logging.Handler):
    """Log records as plain lines on the progress console: the message alone for INFO and DEBUG,
    '<level>: message' from WARNING up. (rich's RichHandler lays records out in a table that wraps long
    lines at the terminal width and pads them with spaces, which breaks paths and captured logs.) Records
    quote file names and captions: `printable` shows their control characters as escapes."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = printable(record.getMessage(), MESSAGE_LIMIT)
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            _console.print(message, highlight=False, markup=False)  # a path with [brackets] stays as it is
        except Exception:  # noqa: BLE001 -- logging's contract: a failing handler reports, never raises
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show records of the `pipeline` and `stages` loggers at `level` and above on stderr (idempotent)."""
    handler = ConsoleHandler()
    handler.set_name(_HANDLER_NAME)
    for name in ("pipeline", "stages"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)


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
            # the description is rich markup in the column: a name in it with [brackets] must stay text
            bar = Bar(prog, prog.add_task(escape(printable(description)), total=total, postfix=""), unit)
            yield bar
    else:
        bar = Bar(None, None, unit)
        yield bar
    elapsed = time.perf_counter() - start
    rate = bar.done / elapsed if elapsed > 0 else float("inf")
    log.info("%s: %s %s in %.1f s (%s %s/s)", description, f"{bar.done:,}", unit, elapsed, f"{rate:,.1f}", unit)
