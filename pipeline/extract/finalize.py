"""Finalization (rank 0): every unit's checksum recorded, the splits with skipped images compacted
(crash-safe, by two renames), the skipped images and the embedded files' digests in the attrs, then
complete=true and `.extract/` removed; a store rewritten beside the complete one it replaces is then swapped in
(`publish`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.data.index import DatasetIndex, SplitView
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.units import WORK_DIR, Unit, image_chunks
from pipeline.hashing import sha256_file
from pipeline.store.durable import fsync_dir, fsync_tree, remove_partial_files, replace_dir, write_file_durably
from pipeline.store.features import FEATURE_STORE, UNPAIRED_TEXT
from pipeline.store.features_writer import StoreWriter


def finalize(
    out: Path,
    index: DatasetIndex,
    views: dict[str, SplitView],
    units: list[Unit],
    cfg: ExtractConfig,
    teachers: list[str] | None = None,
) -> None:
    """`teachers`: the main store's extra teachers (attrs `teachers`, absent when there are none); None for an
    extra teacher's own store."""
    work = out / WORK_DIR
    bad: dict[str, dict[int, str]] = {s: {} for s in views}
    digests: dict[tuple[str, str], dict[int, str]] = {}
    for u in units:
        marker = work / "done" / u.marker
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise RuntimeError(f"{out}: chunk {u.marker} was not committed by its rank") from None
        digests.setdefault((u.split, u.array), {})[u.index] = record.get("sha256")
        for entry in record.get("bad", []):
            bad[u.split][int(entry["row"])] = str(entry["reason"])
            if cfg.on_bad_image == "error":  # recorded by an earlier run with on_bad_image=skip
                row = int(entry["row"])
                raise InputError(
                    f"{views[u.split].image_ref[row].describe()}: cannot read image ({entry['reason']}); "
                    "set extract.on_bad_image=skip to leave such images out"
                )
    writer = StoreWriter(out)
    # a compacted split gets the checksums of its new chunks from the compaction; a marker written before
    # checksums existed (a run resumed across the upgrade) has none: its chunk is hashed now
    writer.record_checksums(
        {
            (s, a): {i: d or sha256_file(writer.chunk_path(s, a, i)) for i, d in found.items()}
            for (s, a), found in digests.items()
            if not bad[s]
        }
    )
    skipped = []
    for s, rows in bad.items():
        if not rows:
            continue
        _compact_split(out, s, views[s], sorted(rows), cfg.chunk_rows)
        for r in sorted(rows):
            skipped.append(
                {
                    "split": s,
                    "index_row": r,
                    "image_id": str(views[s].image_id[r]),
                    "path": str(index.image_path[views[s].image_rows[r]]),
                    "reason": rows[r],
                }
            )
    remove_partial_files(out)
    # which image files the store embedded (readers compare it with the index), per chunk (a rerun redoes the
    # chunks whose files changed); both absent when the index has no hashes
    content = {"image_content": index.content_digest(splits=list(views)), "image_chunks": image_chunks(units)}
    if content["image_content"] is None:
        content = {}
    if teachers is not None:
        _set_teachers(out, teachers)
    StoreWriter(out).set_attrs(skipped_images=skipped, **content, complete=True)
    shutil.rmtree(work)
    fsync_dir(out)


def _set_teachers(out: Path, teachers: list[str]) -> None:
    """The attr `teachers` lists the extra teachers' stores under teachers/; a store without any has no such
    attr (it is then byte for byte the store kdpipe wrote before there were extra teachers)."""
    import zarr

    attrs = zarr.open_group(str(out), mode="r+").attrs
    if teachers:
        attrs["teachers"] = list(teachers)
    elif "teachers" in attrs:
        del attrs["teachers"]
    fsync_dir(out)


def publish(out: Path, stage: Path) -> None:
    """Swap the complete store rewritten at `stage` in for the one at `out` (durable.replace_dir: at no moment
    is there no complete store at `out`). A rerun after a kill between the two finds `stage` complete and
    publishes it then (resume.prepare_store)."""
    shutil.rmtree(stage / WORK_DIR, ignore_errors=True)
    replace_dir(stage, out, FEATURE_STORE)


def finish_swaps(out: Path) -> None:
    """A finalization killed between the two renames of `_compact_split` left a split only under
    .extract/compact/: put it in place before anything reads the store."""
    work = out / WORK_DIR
    if not (work / "trash").is_dir():
        return
    for old in (work / "trash").iterdir():
        new = work / "compact" / old.name
        if not (out / old.name).exists() and new.is_dir():
            os.replace(new, out / old.name)
            fsync_dir(out)


def _compact_split(out: Path, split: str, view: SplitView, bad_rows: list[int], chunk_rows: int) -> None:
    """Rewrite `split` without the bad images and their captions (unpaired texts are kept as they are).
    Crash-safe: the new split is built
    under .extract/compact/ and swapped in by two renames; each step is redone or skipped on a rerun."""
    work = out / WORK_DIR
    compact, trash = work / "compact", work / "trash"
    built = work / f"compact-{split}.built"
    if (trash / split).exists():  # the old split is already moved away: finish the swap
        if (compact / split).exists():
            os.replace(compact / split, out / split)
        return
    if not built.is_file():
        keep = np.ones(view.n_images, dtype=bool)
        keep[bad_rows] = False
        new_row = np.cumsum(keep) - 1
        cap_keep = keep[view.text_image]
        old = StoreWriter(out)
        new = StoreWriter.create(
            compact,
            layout={split: (int(keep.sum()), int(cap_keep.sum()), len(view.unpaired_text))},
            dim=old.dim,
            dtype=str(old.dtype),
            chunk_rows=chunk_rows,
        )
        masks = (("image_emb", keep), ("text_emb", cap_keep), (UNPAIRED_TEXT, np.ones(len(view.unpaired_text), bool)))
        for array, mask in masks:
            if not mask.any():
                continue  # an empty or absent array: nothing to copy
            rows = old.read_rows(split, array)
            kept = np.flatnonzero(mask)
            for i in range(new.n_chunks(split, array)):
                a, b = new.chunk_range(split, array, i)
                new.write_chunk(split, array, i, rows[kept[a:b]], normalize=False)
        new.record_checksums()
        new.write_text_image(split, new_row[view.text_image[cap_keep]])
        new.write_image_id(split, view.image_id[keep].tolist())
        fsync_tree(compact / split)
        write_file_durably(built, b"")
    trash.mkdir(parents=True, exist_ok=True)
    os.replace(out / split, trash / split)
    fsync_dir(out)
    os.replace(compact / split, out / split)
    fsync_dir(out)
