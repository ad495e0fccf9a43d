"""Errors of the machine rather than of the input, turned into one line that names the path and what to do.

Disk full, a read-only or forbidden location, too many open files, out of memory, a path of the wrong kind
(a directory given where a file is written, a file in the middle of a path): these can happen at
any write or allocation, so call sites do not catch them. `run_stage` (stages/_common.py) passes every
escaping exception through `environment_error`, the one place that maps them. Writers only go through
pipeline/store/durable.py, which removes a failed write's temp file and makes the error name the target.
Nothing already complete is touched by such a failure: every output is written to a temp file and
renamed into place, so the previous complete output (or the resumable partial one) stays as it was.
"""

from __future__ import annotations

import errno
import sys

from pipeline.errors import KdpipeError

# errno -> (what happened, what to do). A failed write keeps completed work; the rerun resumes.
_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another workdir, then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or choose another workdir, then rerun"),
    errno.EROFS: ("read-only file system", "choose a writable workdir (--workdir or params.yaml's workdir)"),
    errno.EACCES: ("permission denied", "fix the permissions of that path or choose another location"),
    errno.EPERM: ("operation not permitted", "fix the permissions of that path or choose another location"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or lower the number of workers"),
    errno.ENFILE: ("too many open files on the system", "close other programs or lower the number of workers"),
    errno.ENOMEM: ("out of memory", "lower the batch size or the number of workers"),
    errno.EIO: ("input/output error", "check the disk (dmesg); the file system may be failing"),
    # a path of the wrong kind: `--out DIR` where a file goes, a file where the path needs a directory
    errno.EISDIR: ("is a directory, where a file is expected", "give the path of a file"),
    errno.ENOTDIR: ("a file stands where this path needs a directory", "choose another path"),
    errno.EEXIST: (
        "already exists, and is not what kdpipe creates there (a file where a directory goes?)",
        "choose another path",
    ),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}
_RESUMES = "completed outputs are untouched"


class EnvironmentProblem(KdpipeError):
    """The machine refused: disk full, read-only or forbidden path, out of memory."""


def environment_error(err: BaseException) -> EnvironmentProblem | None:
    """The one-line error for a machine-level failure, or None when `err` is not one (a bug keeps its traceback)."""
    if isinstance(err, OSError) and err.errno in _ADVICE:
        what, todo = _ADVICE[err.errno]
        where = err.filename if err.filename is not None else err.filename2
        prefix = f"{where}: " if where is not None else ""
        return EnvironmentProblem(f"{prefix}{what}; {todo} ({_RESUMES})")
    if _is_gpu_oom(err):
        return EnvironmentProblem(
            "out of GPU memory; lower the batch size (image_batch_size / batch_size) or use a smaller "
            f"compute dtype ({_RESUMES})"
        )
    if isinstance(err, MemoryError):
        return EnvironmentProblem(
            f"out of memory (host RAM); lower the batch size or the number of workers, or close other programs "
            f"({_RESUMES})"
        )
    return None


def _is_gpu_oom(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to look at an error
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(err, oom)
