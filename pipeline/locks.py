"""One writer per output: an advisory lock file beside each output, held for the whole stage.

`.<name>.kdpipe-lock` beside `<name>` (e.g. `artifacts/demo/.features.zarr.kdpipe-lock`) is locked with
flock(2) while a stage writes `<name>`. The holder records who it is (pid, host, since when, command)
in the file, so a second run can say whom it waits for, or refuse at once (`wait=False`). flock locks
die with their process, so a killed holder never leaves a stale lock: the next run takes it over, and
says so because the file still holds the dead holder's record (a clean release empties it).

Advisory: only kdpipe's writers take it; readers do not. torchrun: only the job's rank 0 takes the lock,
before it joins the process group, so the other ranks of a job that waits block in the rendezvous
until their rank 0 holds the lock (stages/_common.py `writing`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import KdpipeError

log = logging.getLogger(__name__)


class OutputLocked(KdpipeError):
    """Another process is writing the output and the caller chose not to wait."""


def lock_path(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.kdpipe-lock"


def describe_holder(record: dict | None) -> str:
    if not record:
        return "another process (it has not recorded itself yet)"
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')} ({record.get('command', '?')})"


@contextmanager
def output_lock(
    output: Path, *, wait: bool = True, poll_s: float = 0.5, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the lock of `output` for the body; wait for another holder (saying who, once) or raise
    `OutputLocked` naming it when `wait` is false."""
    say = say or log.warning  # shown under --quiet too: a run that seems to hang says why
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        told = False
        while not _try_lock(fd):
            holder = describe_holder(_read(fd))
            if not wait:
                raise OutputLocked(
                    f"{output}: being written by {holder}; let it finish (or stop it), or run without --no-wait to wait"
                )
            if not told:
                say(f"{output}: waiting for {holder} to finish writing it")
                told = True
            time.sleep(poll_s)
        previous = _read(fd)
        if previous:  # a clean release empties the file: this holder died holding the lock
            say(f"{output}: taking over the lock of {describe_holder(previous)}, which ended without releasing it")
        _write(fd, _me())
        try:
            yield
        finally:
            _write(fd, None)  # released cleanly (flock itself is released by close)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300],
    }


def _read(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except ValueError:  # being written at this moment, or garbage: nothing reliable to say
        return None


def _write(fd: int, record: dict | None) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
