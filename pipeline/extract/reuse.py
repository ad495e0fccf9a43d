"""Rows an extract run takes from a complete store instead of computing them (`run_extract`'s `source`): the
captions of a views store's views (the views change the images only), the main teacher's rows of an ablation's
own feature store. Only what the source holds exactly as this run would compute it: the same dataset index,
store dtype and rows, the same teacher (for texts its record without a view, which changes images only) and,
for images, the same image files (the content digest of each chunk). Copied bit for bit, each unit with its
marker, so that resuming and finalizing cannot tell them from computed ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import SplitView
from pipeline.extract.config import ExtractConfig
from pipeline.extract.units import Unit
from pipeline.store.durable import write_file_durably
from pipeline.store.features import UNPAIRED_TEXT, FeatureStore
from pipeline.store.features_writer import StoreWriter
from pipeline.teachers.base import teacher_record

log = logging.getLogger(__name__)


def reusable(
    source: FeatureStore | None, teacher: Any, cfg: ExtractConfig, views: dict[str, SplitView], fingerprint: str
) -> tuple[FeatureStore | None, FeatureStore | None]:
    """(the source of the texts, of the images): `source` where it holds what this run computes, else None."""
    if source is None or source.dataset.get("fingerprint") != fingerprint:
        return None, None
    if source.attrs.get("dtype") != cfg.store_dtype or source.skipped_images:
        return None, None
    for s, v in views.items():
        if s not in source.splits:
            return None, None
        split = source.split(s)
        if (split.n_images, split.n_captions, split.n_unpaired_texts) != (
            v.n_images,
            v.n_captions,
            len(v.unpaired_text),
        ):
            return None, None
    record = teacher_record(teacher)
    texts = source if {k: x for k, x in record.items() if k != "view"} == source.teacher else None
    images = source if record == source.teacher else None
    if texts is None:
        log.info(f"{source.path}: another teacher's rows; every row is computed")
    return texts, images


def copy_units(units: list[Unit], source: FeatureStore, writer: StoreWriter, work: Path) -> list[Unit]:
    """Commit each of `units` with `source`'s rows, where it can (an image unit only if the source's chunk holding
    its first row records the same image files: `image_chunks`); returns the units left to compute."""
    left = []
    chunks = source.attrs.get("image_chunks") or {}
    for u in units:
        split = source.split(u.split)
        record: dict[str, Any] = {}
        if u.array == "image_emb":
            if not _same_images(u, chunks.get(u.split), split.n_images):
                left.append(u)
                continue
            rows, record = split.image_emb, {"bad": [], "images": u.content}
        else:
            rows = split.unpaired_text_emb if u.array == UNPAIRED_TEXT else split.text_emb
        digest = writer.write_chunk(u.split, u.array, u.index, np.asarray(rows[u.start : u.stop]), normalize=False)
        write_file_durably(work / "done" / u.marker, json.dumps({**record, "sha256": digest}).encode())
    return left


def _same_images(unit: Unit, recorded: list[str] | None, n_images: int) -> bool:
    """Whether the source's image chunks at the unit's rows hold the same image files: its chunks have the unit's
    boundaries (the same chunking of the same rows) and the same content digest."""
    if unit.content is None or not recorded:
        return False
    per_chunk = -(-n_images // len(recorded))  # the source's rows per image chunk (balanced: all but the last)
    if unit.start % per_chunk or unit.start // per_chunk >= len(recorded):
        return False
    i = unit.start // per_chunk
    return recorded[i] == unit.content and min(n_images, (i + 1) * per_chunk) == unit.stop
