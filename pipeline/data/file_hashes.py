"""Content hashes of the image files, with a size+mtime fast path kept outside the tracked outputs.

`kdpipe prepare` records each image file's sha256 in the dataset index (pipeline/data/index.py), so that a
file replaced after prepare is seen (issue 13). sha256, not blake2b: with the CPU's SHA extensions
hashlib's sha256 ran at 1340 MB/s against blake2b's 729 MB/s (64 MB buffer, best of 3, one core, load
average 3.1 on 2 cores), and it is what users compare with `sha256sum`.

Hashing every file on every run would read the whole dataset (COCO: ~19 GB) just to find nothing changed,
so a file whose size and mtime (ns) equal those recorded at its last hashing keeps its hash without being
read. That record lives in `<workdir>/.kdpipe/file_stats.json`, never in the index or the image cache:
sizes and mtimes differ on every clone and machine, and DVC hashes those outputs, so they must hold content
only. The file is a cache (deleting it costs one re-hash), written durably, gitignored:
    {"version": 1, "files": {"<absolute path>": [size, mtime_ns, "<sha256 hex>"], ...}}
`verify=True` (`kdpipe prepare --verify`) ignores it and hashes every file: a file rewritten with the same
size and its mtime put back (os.utime, some sync tools) is only caught that way.
"""

from __future__ import annotations

import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.hashing import sha256_file
from pipeline.store.durable import write_text_durably

STATS_VERSION = 1
# a file modified this recently may be modified again within the filesystem's mtime granularity without its
# mtime changing ("racy git"): its hash is used but not remembered, so the next run hashes it again
_RACY_NS = 2_000_000_000


def content_hashes(
    paths: list[str], stats_file: Path, *, verify: bool = False, threads: int = 4
) -> tuple[list[str | None], int]:
    """(sha256 hex of each file, or None where it cannot be read; how many files were read to hash them).

    `paths` must be absolute (they key the stats cache). Files are hashed by `threads` threads (hashlib
    releases the GIL on large buffers, so reading and hashing overlap)."""
    recorded = _load(stats_file)
    known = {} if verify else recorded
    now = time.time_ns()
    hashes: list[str | None] = [None] * len(paths)
    stats: dict[str, list] = {}
    todo: list[int] = []
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue  # missing or unreachable: no hash; prepare reports the file when it fails to decode
        if not stat.S_ISREG(st.st_mode):
            continue
        stats[p] = [st.st_size, st.st_mtime_ns]
        hit = known.get(p)
        if hit is not None and hit[:2] == stats[p]:
            hashes[i] = hit[2]
        else:
            todo.append(i)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, digest in zip(todo, pool.map(_try_hash, [paths[i] for i in todo])):
            hashes[i] = digest
    files = {
        p: [*stats[p], h]
        for p, h in zip(paths, hashes)
        if h is not None and p in stats and now - stats[p][1] > _RACY_NS
    }
    if files != recorded:
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(stats_file, json.dumps({"version": STATS_VERSION, "files": files}) + "\n")
    return hashes, len(todo)


def _try_hash(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # unreadable (permissions, vanished): decoding reports it


def _load(stats_file: Path) -> dict[str, list]:
    """The recorded stats, or nothing if the file is missing, damaged or of another version (a cache: rebuilt)."""
    try:
        data = json.loads(Path(stats_file).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != STATS_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {p: v for p, v in data["files"].items() if isinstance(v, list) and len(v) == 3}
