"""The SHA-256 of a file: the one digest kdpipe names files by (teacher checkpoints and weights, the image
files of a dataset, the chunk files of the feature store)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file, read through one reused buffer of `chunk_bytes` (constant memory, no copies:
    what hashlib.file_digest does, with the buffer size a parameter)."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


__all__ = ["sha256_file"]
