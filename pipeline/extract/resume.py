"""Resuming: rank 0 decides at the start between resuming a partial store, reopening a complete one whose
image files changed since (only those chunks are computed again) and starting over; every rank then counts
a unit done by its marker. A complete store is never cleared first: its rewrite (whole, or of the stale chunks
in a hard-linked copy) goes to `staging_dir(out)` beside it and replaces it only once complete, so a full disk
or a kill leaves it whole; a whole rewrite first checks that the disk has room for the second store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import SplitView
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.finalize import finish_swaps, publish
from pipeline.extract.units import WORK_DIR, Unit, image_chunks, staging_dir
from pipeline.store.durable import fsync_tree, link_or_copy, remove_partial_files, write_file_durably
from pipeline.store.features import FORMAT, read_attrs
from pipeline.store.features_writer import StoreWriter, clear_store_dir


def is_done(marker: Path, unit: Unit) -> bool:
    """A unit is done when its marker exists and (image units) was made from the image files the index names
    now: a chunk embedding a file replaced since is computed again. A marker without a record of its images
    (an older kdpipe) or an index without hashes cannot tell, and counts as done, as it did before."""
    if unit.content is None:
        return marker.is_file()
    try:
        recorded = json.loads(marker.read_text()).get("images", unit.content)
    except (OSError, ValueError):
        return False
    return recorded is None or recorded == unit.content


def prepare_store(
    out: Path,
    identity: dict[str, Any],
    views: dict[str, SplitView],
    units: list[Unit],
    cfg: ExtractConfig,
    fresh: bool,
    keep_complete: bool = False,
    reopen_complete: bool = False,
) -> tuple[str | None, str | None]:
    """Rank 0: decide between resuming and starting over, and create the store when starting over; the units
    then go to `units.target_dir(out)`.

    A complete store of the same identity (and no skipped images) is, instead of being rewritten: reopened
    when image files changed since (their chunks are computed again) or when `reopen_complete` (the main
    store of a run with extra teachers: its chunks are reused while their stores are brought up to date);
    kept untouched when `keep_complete` (an extra teacher's store) and nothing changed.

    Returns (a line to print, the reason an existing partial store was not resumed)."""
    attrs = read_attrs(out)
    if _ours(attrs) and attrs.get("complete") is True and not (out / WORK_DIR / "created").is_file():
        return _prepare_beside(out, attrs, identity, views, units, cfg, fresh, keep_complete, reopen_complete)
    shutil.rmtree(staging_dir(out), ignore_errors=True)  # a rewrite whose complete store is gone: nothing to keep
    return _prepare_in(out, identity, views, units, cfg, fresh)


def _prepare_beside(
    out: Path,
    attrs: dict[str, Any],
    identity: dict[str, Any],
    views: dict[str, SplitView],
    units: list[Unit],
    cfg: ExtractConfig,
    fresh: bool,
    keep_complete: bool = False,
    reopen_complete: bool = False,
) -> tuple[str | None, str | None]:
    """The complete store at `out` stays in place: kept as it is (`keep_complete`, nothing changed), or its
    rewrite is resumed or started in the staging directory (a hard-linked copy when its chunks are reused)."""
    stage = staging_dir(out)
    staged = read_attrs(stage)
    if _ours(staged) and staged.get("complete") is True and not fresh and _identity_diff(staged, identity) is None:
        publish(out, stage)  # an earlier run was killed after its rewrite was complete: only the swap was left
        return "already complete", None
    if _ours(staged) and (stage / WORK_DIR / "created").is_file():
        return _prepare_in(stage, identity, views, units, cfg, fresh)  # the rewrite an earlier run began
    shutil.rmtree(stage, ignore_errors=True)  # what a killed copy left (kdpipe's own name, `.NAME.next`)
    stale = 0 if fresh else _stale_chunks(attrs, identity, units)
    reusable = not stale and not fresh and _reusable(attrs, identity, units)
    if reusable and keep_complete:
        return "complete, computed by the same teacher from the same rows: kept", None
    if stale or (reusable and reopen_complete):
        # hard links cost no space: every write replaces a file by rename, so the complete store never changes
        shutil.copytree(out, stage, copy_function=link_or_copy)
        _reopen(stage, units, attrs.get("image_chunks"))
        if stale:
            return f"{stale} image chunk(s) embed image files changed since: computing only those again", None
        return "complete, computed by the same teacher: its chunks reused, the other teachers' stores checked", None
    # a finished store: a stage rewrites its output (DVC reruns it only when an input changed)
    _require_space(out, identity, units)
    _create(stage, identity, views, cfg)
    return "rewriting the complete store of an earlier run (it stays in place until the new one is complete)", None


def _prepare_in(
    target: Path,
    identity: dict[str, Any],
    views: dict[str, SplitView],
    units: list[Unit],
    cfg: ExtractConfig,
    fresh: bool,
) -> tuple[str | None, str | None]:
    """Resume the partial store at `target` (which holds no complete store to keep), or start over there."""
    work = target / WORK_DIR
    attrs = read_attrs(target)
    reason = None
    if _ours(attrs) and (work / "created").is_file():
        diff = _identity_diff(attrs, identity)
        if fresh:
            reason = "--fresh given"
        elif diff:
            reason = f"the partial store was computed with a different {diff}"
        elif attrs.get("complete") is True:
            shutil.rmtree(work)  # an earlier run was killed after complete=true: only cleanup was left
            return "already complete", None
        else:
            remove_partial_files(target)
            finish_swaps(target)
            n_done = sum(1 for _ in (work / "done").rglob("*.json")) if (work / "done").is_dir() else 0
            return f"resuming an interrupted extraction ({n_done} chunks already done)", None
    elif _ours(attrs) or (work.is_dir() and target.is_dir()):
        reason = "the partial store was killed while it was being set up"
    _create(target, identity, views, cfg)
    return (f"{reason}; starting over" if reason else None), reason


def _ours(attrs: dict[str, Any] | None) -> bool:
    return attrs is not None and attrs.get("format") == FORMAT


def _create(target: Path, identity: dict[str, Any], views: dict[str, SplitView], cfg: ExtractConfig) -> None:
    """A new partial store at `target` (what was there is cleared: a partial store, or nothing) with its small
    arrays written, marked `created`."""
    clear_store_dir(target)
    layout = {s: (v.n_images, v.n_captions, len(v.unpaired_text)) for s, v in views.items()}
    attrs_new = {k: identity[k] for k in ("teacher", "dataset", "extract")}
    attrs_new["skipped_images"] = []
    writer = StoreWriter.create(
        target, layout=layout, dim=identity["dim"], dtype=identity["dtype"], chunk_rows=cfg.chunk_rows, attrs=attrs_new
    )
    for s, v in views.items():
        writer.write_text_image(s, v.text_image)
        writer.write_image_id(s, v.image_id.tolist())
    fsync_tree(target)
    write_file_durably(target / WORK_DIR / "created", b"")


def _require_space(out: Path, identity: dict[str, Any], units: list[Unit]) -> None:
    """Refuse (one line) to rewrite the complete store at `out` beside it on a disk without room for both: the
    embedding rows, and a little for the small arrays and metadata."""
    rows = sum(u.rows for u in units)
    need = int(rows * identity["dim"] * np.dtype(identity["dtype"]).itemsize * 1.01) + 64 * rows + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise InputError(
            f"{out}: rewriting this complete store needs about {_size(need)} free beside it (it stays in place "
            f"until the new one is complete), {_size(free)} are free; free space, or delete the old store to "
            "rewrite it in its place"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _stale_chunks(attrs: dict[str, Any], identity: dict[str, Any], units: list[Unit]) -> int:
    """How many image chunks of a complete store embed files that changed since, when ONLY that differs
    (same identity, the index's chunk layout, no skipped images), else 0: the store is then rewritten whole.
    Caveat: a teacher whose code changed without its identity() changing is not seen here; `--fresh` (or a
    store with nothing stale, which is rewritten whole) covers it."""
    recorded = attrs.get("image_chunks")
    if not recorded or attrs.get("skipped_images") or _identity_diff(attrs, identity):
        return 0
    wanted = image_chunks(units)
    if wanted is None or {s: len(c) for s, c in wanted.items()} != {s: len(c) for s, c in recorded.items()}:
        return 0
    return sum(a != b for s in wanted for a, b in zip(wanted[s], recorded[s]))


def _reusable(attrs: dict[str, Any], identity: dict[str, Any], units: list[Unit]) -> bool:
    """A complete store whose every chunk can be reused as it is: the same identity, no skipped images (a
    compacted split no longer lines up with the units), the index's layout and, where recorded, the same files."""
    if attrs.get("skipped_images") or _identity_diff(attrs, identity):
        return False
    recorded, wanted = attrs.get("image_chunks"), image_chunks(units)
    return recorded is None or wanted is None or recorded == wanted


def _reopen(out: Path, units: list[Unit], recorded: dict[str, list[str]] | None) -> None:
    """Turn a complete store back into a partial one whose every unit is done, each image unit with the
    digest it was made from: the ordinary resumption then computes exactly the stale ones. complete=false
    goes first, so that a crash in between leaves a store that is never taken as finished."""
    StoreWriter(out).set_attrs(complete=False)
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    for u in units:
        if u.array != "image_emb":
            record = {}
        else:  # None: the store records no image files (an index without hashes)
            record = {"bad": [], "images": recorded[u.split][u.index] if recorded is not None else None}
        write_file_durably(work / "done" / u.marker, json.dumps(record).encode())
    write_file_durably(work / "created", b"")


def _identity_diff(attrs: dict[str, Any], identity: dict[str, Any]) -> str | None:
    names = {
        "teacher": "teacher",
        "dataset": "dataset index (fingerprint)",
        "dim": "teacher dimension",
        "dtype": "store_dtype",
        "splits": "list of splits",
    }
    for key in ("dataset", "teacher", "dim", "dtype", "splits"):
        if attrs.get(key) != identity[key]:
            return names[key]
    old, new = attrs.get("extract") or {}, identity["extract"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        return "extract setting (" + ", ".join(changed) + ")"
    return None
