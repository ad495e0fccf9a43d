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

Images inside containers (tar shards, parquet files: pipeline/data/image_source.py) are hashed member by
member, the sha256 of each member's bytes (= the file's hash once untarred), and remembered per container:
    "containers": {"<absolute path>": [size, mtime_ns, {"<member key>": "<sha256 hex>", ...}], ...}
A container whose size and mtime are unchanged keeps its members' hashes; otherwise all of its members that
the index names are read again, in order, in one pass over the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.image_source import ImageFiles, ImageRef
from pipeline.hashing import sha256_file
from pipeline.store.durable import write_text_durably

STATS_VERSION = 1
# a file modified this recently may be modified again within the filesystem's mtime granularity without its
# mtime changing ("racy git"): its hash is used but not remembered, so the next run hashes it again
_RACY_NS = 2_000_000_000


def content_hashes(
    refs: list[ImageRef | str], stats_file: Path, *, verify: bool = False, threads: int = 4
) -> tuple[list[str | None], int]:
    """(sha256 hex of each image, or None where it cannot be read; how many images were read to hash them).

    `refs`: image files (their paths) or ImageRefs, with absolute paths (they key the stats cache). Files and
    containers are hashed by `threads` threads (hashlib releases the GIL on large buffers, so reading and
    hashing overlap)."""
    refs = [r if isinstance(r, ImageRef) else ImageRef(r) for r in refs]
    recorded, recorded_containers = _load(stats_file)
    known, known_containers = ({}, {}) if verify else (recorded, recorded_containers)
    now = time.time_ns()
    hashes: list[str | None] = [None] * len(refs)
    paths = [r.path for r in refs]
    stats: dict[str, list] = {}
    todo: list[int] = []
    members: dict[str, list[int]] = {}  # container path -> positions of its members in `refs`
    for i, ref in enumerate(refs):
        if ref.container:
            members.setdefault(ref.path, []).append(i)
    for i, p in enumerate(paths):
        if refs[i].container:
            continue
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
    containers: dict[str, list] = {}
    stale: list[str] = []  # containers whose members are read again
    for path, positions in members.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        hit = known_containers.get(path)
        size_mtime = [st.st_size, st.st_mtime_ns]
        keys = [refs[i].key for i in positions]
        if hit is not None and hit[:2] == size_mtime and all(k in hit[2] for k in keys):
            for i, k in zip(positions, keys):
                hashes[i] = hit[2][k]
        else:
            stale.append(path)
        if now - st.st_mtime_ns > _RACY_NS:
            containers[path] = [*size_mtime, {}]
    n_read = len(todo) + sum(len(members[p]) for p in stale)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, digest in zip(todo, pool.map(_try_hash, [paths[i] for i in todo])):
            hashes[i] = digest
        for path, digests in zip(stale, pool.map(lambda p: _hash_members([refs[i] for i in members[p]]), stale)):
            for i, digest in zip(members[path], digests):
                hashes[i] = digest
    for path, record in containers.items():
        record[2] = {refs[i].key: hashes[i] for i in members[path] if hashes[i] is not None}
    files = {
        p: [*stats[p], h]
        for p, h in zip(paths, hashes)
        if h is not None and p in stats and now - stats[p][1] > _RACY_NS
    }
    if files != recorded or containers != recorded_containers:
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": STATS_VERSION, "files": files, **({"containers": containers} if containers else {})}
        write_text_durably(stats_file, json.dumps(doc) + "\n")
    return hashes, n_read


def _hash_members(refs: list[ImageRef]) -> list[str | None]:
    """sha256 of each member's bytes (None: unreadable), read in the container's order."""
    out: list[str | None] = [None] * len(refs)
    with ImageFiles() as files:
        for i in sorted(range(len(refs)), key=lambda i: refs[i].offset):
            try:
                out[i] = hashlib.sha256(files.read(refs[i])).hexdigest()
            except OSError:
                pass  # unreadable (a short shard, an empty cell): decoding reports it, by shard and member
    return out


def _try_hash(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # unreadable (permissions, vanished): decoding reports it


def _load(stats_file: Path) -> tuple[dict[str, list], dict[str, list]]:
    """The recorded stats of files and of containers, or nothing if the file is missing, damaged or of another
    version (a cache: rebuilt)."""
    try:
        data = json.loads(Path(stats_file).read_text())
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(data, dict) or data.get("version") != STATS_VERSION or not isinstance(data.get("files"), dict):
        return {}, {}
    files = {p: v for p, v in data["files"].items() if isinstance(v, list) and len(v) == 3}
    containers = data.get("containers") if isinstance(data.get("containers"), dict) else {}
    return files, {
        p: v for p, v in containers.items() if isinstance(v, list) and len(v) == 3 and isinstance(v[2], dict)
    }
