"""Atomic, durable writes: the one helper every writer of kdpipe goes through.

A file is written to a temp name beside its target, flushed and fsync'd, renamed over the target (atomic on
POSIX and Windows), and the directory is fsync'd so that the rename itself survives a crash. Readers therefore
see the old file or the new one, never a half-written one, and a killed writer leaves at most a `*.partial`
file, which `remove_partial_files` deletes (zarr's LocalStore names its own temp files the same way), or a
`*.partial` directory, which the next `atomic_dir` of the same target deletes.

    write_file_durably(path, data)             # bytes
    with atomic_path(path) as tmp:             # anything that writes to a path: h5py, safetensors, PIL, ...
        save_file(tensors, str(tmp))
    with atomic_dir(path, kind) as tmp:        # a whole directory (plots/, a tower, hf/), swapped in over
        write_everything_under(tmp)            # nothing, or an earlier output of `kind` (ownership.py)
    with naming(path):                         # writes made by a library (zarr, dask tasks) into `path`
        ...

kdpipe never deletes what it did not write (pipeline/store/ownership.py): a whole directory replaces only the
writer's own earlier output (`atomic_dir(path, output)` claims `path` for that kind of output first, and
`replace_dir` again before it moves the old one aside), and a file written to a path a command takes or derives
names the kind it may replace (`replaces=`); without one, the caller has claimed the output the file lies in.

A failed write removes its temp file or directory and leaves the target as it was. An OSError that names no
file (a failed write() or fsync() reports none; torch.save's C++ writer turns it into RuntimeError("unexpected
pos") chained on the OSError) is re-raised naming the target, so pipeline/system_errors.py can say in one line
where the disk was full or read-only (`naming` does only that, for writes that do not go through here).
torch.save goes through a Python file object for that reason:

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)

zarr writes its chunk and metadata files atomically (temp + rename) but never fsyncs them: `fsync_file`,
`fsync_dir` and `fsync_tree` add that after zarr wrote.

KDPIPE_FSYNC=0 skips every fsync (tests, throwaway runs). Resuming after a killed *process* stays exact without
it (written pages outlive the process; renames are atomic); fsync adds safety against an OS crash or power loss.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.store.ownership import Output, claim, write_marker

PARTIAL = ".partial"  # suffix of files being written (ours and zarr's)


def fsync_enabled() -> bool:
    return os.environ.get("KDPIPE_FSYNC", "1") != "0"


def fsync_file(path: Path | str) -> None:
    if not fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new file in `path` durable (POSIX only: elsewhere a directory cannot be opened)."""
    if os.name == "posix":
        fsync_file(path)


def fsync_tree(path: Path | str) -> None:
    """fsync every file and directory under `path` (after zarr wrote there, which it does not fsync)."""
    if not fsync_enabled():
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_path(path: Path | str, replaces: Output | None = None) -> Iterator[Path]:
    """Yields a temp path beside `path`; when the block ends without an error the temp file is fsync'd and
    renamed over `path` (then the directory is fsync'd). On an error the temp file is removed, `path` untouched.
    `replaces`: the kind of output `path` is, claimed first (None: `path` lies in an output the caller claimed)."""
    path = Path(path)
    if replaces is not None:
        claim(path, replaces)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # e.g. a read-only directory: the temp file was never created
            tmp.unlink(missing_ok=True)
        _raise_naming(err, path, tmp)
    fsync_dir(path.parent)


def temp_beside(path: Path) -> Path:
    """The temp name of a file or directory being written to replace `path`: `.NAME.PID-XXXXXXXX.partial`
    beside it. The pid tells `remove_stale_dirs` whether its writer is still alive; the random part keeps
    concurrent writers of one target (extract ranks) apart."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}")


@contextlib.contextmanager
def atomic_dir(path: Path | str, output: Output) -> Iterator[Path]:
    """Yields an empty temp directory beside `path`, which is claimed for `output` first; when the block ends
    without an error its tree is fsync'd and it replaces `path` whole (`replace_dir`; with `output.marker`, after
    the list of its files is written into it). On an error the temp directory is removed, `path` untouched."""
    path = Path(path)
    claim(path, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(path)
    tmp = temp_beside(path)
    try:
        tmp.mkdir()
        yield tmp
        if output.marker:
            write_marker(tmp, output)
        fsync_tree(tmp)
        replace_dir(tmp, path, output)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(err, path, tmp)


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """For writes made by a library (zarr's chunk files): an OSError raised inside that names no file is
    re-raised naming `path`, so a full disk is reported with the file that did not fit."""
    try:
        yield
    except BaseException as err:
        _raise_naming(err, Path(path), None)


def _raise_naming(err: BaseException, path: Path, tmp: Path | None) -> None:
    """Re-raise `err`; an OSError that names no file or only the temp name, or one under a RuntimeError (what
    torch's C++ writers make of it), is raised naming `path`. Any other exception (a bug) passes unchanged."""
    cause, seen = err, 0
    while isinstance(cause, RuntimeError) and seen < 8:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if isinstance(cause, OSError) and cause.errno is not None:
        temp_named = tmp is not None and str(cause.filename).startswith(str(tmp))
        if cause is not err or cause.filename is None or temp_named:
            raise OSError(cause.errno, cause.strerror, str(path)) from err  # OSError(errno) picks the subclass
    raise err


def write_file_durably(path: Path | str, data: bytes | memoryview, replaces: Output | None = None) -> None:
    """Write `data` to `path` atomically and durably (`replaces`: as for `atomic_path`)."""
    with atomic_path(path, replaces) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_durably(path: Path | str, text: str, replaces: Output | None = None) -> None:
    write_file_durably(path, text.encode("utf-8"), replaces)


def link_or_copy(src: str, dst: str) -> None:
    """`shutil.copytree`'s copy_function for a copy that costs no bytes where the filesystem allows: a hard link
    (safe because kdpipe replaces files by rename, never in place, so neither copy sees the other's later
    writes), else a copy."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def replace_dir(src: Path, dst: Path, output: Output) -> None:
    """Move directory `src` (complete and fsync'd by the caller) to `dst`, replacing `dst`, which must be absent,
    empty or `output`'s own (claimed again here, just before it is moved aside and deleted); at no moment does
    `dst` hold a partial directory (the old one is moved aside first, then deleted)."""
    claim(dst, output)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_dirs(path: Path | str) -> None:
    """Remove what a killed writer of directory `path` left beside it: its temp directories (`temp_beside`)
    whose process is gone, and old copies (`.NAME.old-*`) that `replace_dir` did not get to delete. A live
    writer's temp directory stays (the caller's lock makes that another process's rare case). Only names of
    exactly those two forms are touched."""
    path = Path(path)
    for d in path.parent.glob(f".{glob.escape(path.name)}.*"):
        rest = d.name[len(path.name) + 2 :]
        if not d.is_dir() or d.is_symlink():
            continue
        if _OLD_NAME.fullmatch(rest):
            shutil.rmtree(d, ignore_errors=True)
        elif (m := _TEMP_NAME.fullmatch(rest)) and not _process_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


_OLD_NAME = re.compile(r"old-[0-9a-f]{12}")  # replace_dir's name of the directory it replaced
_TEMP_NAME = re.compile(r"([0-9]+)-[0-9a-f]{8}" + re.escape(PARTIAL))  # temp_beside's, after ".NAME."


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_partial_files(path: Path | str) -> None:
    """Remove files left half-written under `path` by a killed writer (`*.partial`, ours and zarr's)."""
    for f in Path(path).rglob(f"*{PARTIAL}"):
        if f.is_file():
            f.unlink(missing_ok=True)
