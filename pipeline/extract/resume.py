"""Resuming: rank 0 decides at the start between resuming a partial store, reopening a complete one whose
image files changed since (only those chunks are computed again) and starting over; every rank then counts
a unit done by its marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.data.index import SplitView
from pipeline.extract.config import ExtractConfig
from pipeline.extract.finalize import finish_swaps
from pipeline.extract.units import WORK_DIR, Unit, image_chunks
from pipeline.store.durable import fsync_tree, remove_partial_files, write_file_durably
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
    """Rank 0: decide between resuming and starting over, and create the store when starting over.

    A complete store of the same identity (and no skipped images) is, instead of being rewritten: reopened
    when image files changed since (their chunks are computed again) or when `reopen_complete` (the main
    store of a run with extra teachers: its chunks are reused while their stores are brought up to date);
    kept untouched when `keep_complete` (an extra teacher's store) and nothing changed.

    Returns (a line to print, the reason an existing partial store was not resumed)."""
    work = out / WORK_DIR
    attrs = read_attrs(out)
    ours = attrs is not None and attrs.get("format") == FORMAT
    message = reason = None
    if ours and (work / "created").is_file():
        diff = _identity_diff(attrs, identity)
        if fresh:
            reason = "--fresh given"
        elif diff:
            reason = f"the partial store was computed with a different {diff}"
        elif attrs.get("complete") is True:
            shutil.rmtree(work)  # an earlier run was killed after complete=true: only cleanup was left
            return "already complete", None
        else:
            remove_partial_files(out)
            finish_swaps(out)
            n_done = sum(1 for _ in (work / "done").rglob("*.json")) if (work / "done").is_dir() else 0
            return f"resuming an interrupted extraction ({n_done} chunks already done)", None
    elif ours and attrs.get("complete") is True:
        stale = 0 if fresh else _stale_chunks(attrs, identity, units)
        if stale:
            _reopen(out, units, attrs["image_chunks"])
            return f"{stale} image chunk(s) embed image files changed since: computing only those again", None
        reusable = not fresh and _reusable(attrs, identity, units)
        if reusable and keep_complete:
            return "complete, computed by the same teacher from the same rows: kept", None
        if reusable and reopen_complete:
            _reopen(out, units, attrs.get("image_chunks"))
            return "complete, computed by the same teacher: its chunks reused, the other teachers' stores checked", None
        # a finished store: a stage rewrites its output (DVC reruns it only when an input changed)
        message = "replacing the complete store of an earlier run"
    elif ours or (work.is_dir() and out.is_dir()):
        reason = "the partial store was killed while it was being set up"
    if reason:
        message = f"{reason}; starting over"
    clear_store_dir(out)
    layout = {s: (v.n_images, v.n_captions, len(v.unpaired_text)) for s, v in views.items()}
    attrs_new = {k: identity[k] for k in ("teacher", "dataset", "extract")}
    attrs_new["skipped_images"] = []
    writer = StoreWriter.create(
        out, layout=layout, dim=identity["dim"], dtype=identity["dtype"], chunk_rows=cfg.chunk_rows, attrs=attrs_new
    )
    for s, v in views.items():
        writer.write_text_image(s, v.text_image)
        writer.write_image_id(s, v.image_id.tolist())
    fsync_tree(out)
    write_file_durably(work / "created", b"")
    return message, reason


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
        images = recorded[u.split][u.index] if recorded is not None else None
        record = {"bad": [], "images": images} if u.array == "image_emb" else {}
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
