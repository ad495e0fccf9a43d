"""One writer per output: an advisory lock file beside each output, held for the whole stage.

`.<name>.kdpipe-lock` beside `<name>` (e.g. `artifacts/demo/.features.zarr.kdpipe-lock`) is locked with
flock(2) while a stage writes `<name>`. The holder records who it is (pid, host, since when, command)
in the file, so a second run can say whom it waits for, or refuse at once (`wait=False`). flock locks
die with their process, so a killed holder never leaves a stale lock: the next run takes it over, and
says so because the file still holds the dead holder's record (a clean release empties it).

Readers (`read_lock`: open_store, open_image_cache, verify_store) take the same file *shared* while they
open and map an output, and let go once mapped: a reader that comes while a run rewrites the output waits
for it, saying whom it waits for (or refuses at once, `wait=False`), and then opens the new output, never one
half rewritten. Waiting, not the old store (which extract keeps whole until the new one is complete), because
the run was started because the old one is out of date. Once open, a reader keeps what it mapped: writers replace files by rename (zarr, durable),
never in place, so its maps hold the old files' contents until it closes them.

Advisory: only kdpipe's processes take it. torchrun: only the job's rank 0 takes the lock, before it joins
the process group, so the other ranks of a job that waits block in the rendezvous until their rank 0 holds
the lock (stages/_common.py `writing`). A thread that holds an output's lock reads it without the shared
lock (flock would make it wait for itself).

`--no-wait` holds for the whole command: inside `never_waiting()` (entered by `writing(no_wait=True)`) a
lock taken without an explicit `wait` refuses instead of waiting, readers of the command's inputs included,
so `kdpipe distill --no-wait` next to a running extract stops at once rather than waiting for the store.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import InputError, KdpipeError

log = logging.getLogger(__name__)

# a reader holds the shared lock for the milliseconds of an open: a writer finding the lock taken by nobody
# who recorded itself waits this long without a word before it says so (or, without waiting, refuses)
READER_GRACE_S = 5.0
_held = threading.local()  # .outputs: the resolved outputs this thread holds the writer lock of; .never_wait


class OutputLocked(KdpipeError):
    """Another process is writing the output and the caller chose not to wait."""


def lock_path(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.kdpipe-lock"


def describe_holder(record: dict | None) -> str:
    if not record:
        return "another process (a reader opening it, or a writer that has not recorded itself yet)"
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')} ({record.get('command', '?')})"


@contextmanager
def output_lock(
    output: Path, *, wait: bool | None = None, poll_s: float = 0.5, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the lock of `output` for the body; wait for another holder (saying who, once) or raise
    `OutputLocked` naming it when `wait` is false (None: wait, unless inside `never_waiting()`)."""
    wait = _resolve_wait(wait)
    say = say or log.warning  # shown under --quiet too: a run that seems to hang says why
    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a directory of the output's path goes
        from pipeline.store.ownership import not_a_directory

        raise InputError(
            f"{not_a_directory(path.parent)}: is a file, where a directory of {output} goes; move it away or "
            "choose another path"
        ) from None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    key = Path(output).resolve()
    try:
        told, first_busy = False, time.monotonic()
        while not _try_lock(fd, fcntl.LOCK_EX):
            record = _read(fd)
            if record is None and time.monotonic() - first_busy < READER_GRACE_S:
                time.sleep(min(poll_s, 0.05))  # most likely readers opening the output: they are done in ms
                continue
            holder = describe_holder(record)
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
        _holding().add(key)
        try:
            yield
        finally:
            _holding().discard(key)
            _write(fd, None)  # released cleanly (flock itself is released by close)
    finally:
        os.close(fd)


@contextmanager
def read_lock(
    output: Path, *, wait: bool | None = None, poll_s: float = 0.2, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the lock of `output` shared for the body (open and map it there): wait while a writer holds it
    (saying who, once), or raise `OutputLocked` naming the writer when `wait` is false (None: wait, unless
    inside `never_waiting()`). Without a lock file that this process may create (a read-only location, or no
    directory: the open then says what is missing), no kdpipe writer can be writing there through this
    path, and the body runs unlocked."""
    wait = _resolve_wait(wait)
    say = say or log.warning
    output = Path(output).resolve()
    if output in _holding():
        yield
        return
    fd = _open_for_reading(lock_path(output))
    if fd is None:
        yield
        return
    try:
        told = False
        while not _try_lock(fd, fcntl.LOCK_SH):
            holder = describe_holder(_read(fd))
            if not wait:
                raise OutputLocked(f"{output}: being rewritten by {holder}; run again once it has finished")
            if not told:
                say(f"{output}: waiting for {holder} to finish writing it before reading it")
                told = True
            time.sleep(poll_s)
        yield
    finally:
        os.close(fd)


def _open_for_reading(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o664)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:  # not ours to create: open it if a writer made it
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


@contextmanager
def never_waiting() -> Iterator[None]:
    """In the body (this thread), locks taken without an explicit `wait` refuse instead of waiting."""
    before = getattr(_held, "never_wait", False)
    _held.never_wait = True
    try:
        yield
    finally:
        _held.never_wait = before


def _resolve_wait(wait: bool | None) -> bool:
    return (not getattr(_held, "never_wait", False)) if wait is None else wait


def _holding() -> set[Path]:
    if not hasattr(_held, "outputs"):
        _held.outputs = set()
    return _held.outputs


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
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
