"""The views store (format `kdpipe-views` v1, written by `kdpipe views`: pipeline/extract/views.py tells what it
holds): its format, what may be written over, and its reader for distill (`open_views`), which imports none of
extract's code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.pixels import PixelRecipe
from pipeline.errors import InputError
from pipeline.store.features import FeatureStore, open_store, read_attrs
from pipeline.store.ownership import Output

FORMAT = "kdpipe-views"
VERSION = 1


def is_views_dir(path: Path | str) -> bool:
    attrs = read_attrs(path)
    return attrs is not None and attrs.get("format") == FORMAT


# What `kdpipe views` may replace or write into (pipeline/store/ownership.py): a views store (complete or not)
VIEWS_STORE = Output("a views store", directory=True, recognise=is_views_dir)


def store_path(out: Path | str, view: int) -> Path:
    """The feature store of view `view` inside the views store `out`."""
    return Path(out) / str(view)


@dataclass(frozen=True)
class ViewTargets:
    """The views of one split, for distill: `emb` [A, N, D] (view v of image row r at [v, r]; the teacher's
    features, float16/32 as stored) and `boxes` float32 [N, A, 5]."""

    emb: np.ndarray
    boxes: np.ndarray
    identity: dict[str, Any]  # the store's settings, recipe and dataset (a checkpoint is resumed only with the same)

    @property
    def count(self) -> int:
        return int(self.boxes.shape[1])


def open_views(path: Path | str, store: FeatureStore, split: str, recipe: PixelRecipe) -> ViewTargets:
    """The views of `split`, checked against the main store `store` (same dataset, rows and teacher) and the
    student's image recipe `recipe` (the boxes are fractions of its frame); every problem one line."""
    import zarr

    path = Path(path)
    todo = "run `kdpipe views`"
    attrs = read_attrs(path)
    if attrs is None or attrs.get("format") != FORMAT:
        raise InputError(f"{path}: no views store here; {todo} (distill.teacher_views reads it)")
    if attrs.get("version") != VERSION:
        raise InputError(f"{path}: views store version {attrs.get('version')!r}; this kdpipe reads version {VERSION}")
    if attrs.get("complete") is not True:
        raise InputError(f"{path}: the views store is incomplete (interrupted or still running); {todo} to finish it")
    if (attrs.get("dataset") or {}).get("fingerprint") != store.dataset.get("fingerprint"):
        raise InputError(f"{path}: computed from another dataset index than {store.path}; {todo} again")
    if split not in (attrs.get("splits") or []):
        raise InputError(f"{path}: no views of split {split!r} (views.splits: {attrs.get('splits')}); {todo} again")
    if attrs.get("pixels") != recipe.describe():
        raise InputError(
            f"{path}: its boxes are in the frame of another image recipe than the student's cache "
            f"(prepare.image); {todo} again"
        )
    count = attrs.get("count")
    if not isinstance(count, int) or count < 1:
        raise InputError(f"{path}: attribute count={count!r} is not a positive integer; {todo} again")
    main, emb = store.split(split), []
    for v in range(count):
        sub = open_store(store_path(path, v), expect_fingerprint=store.dataset.get("fingerprint"), expect_dim=store.dim)
        own = {k: x for k, x in sub.teacher.items() if k != "view"}
        if own != store.teacher:
            raise InputError(f"{sub.path}: computed by another teacher than {store.path}'s; {todo} again")
        rows = sub.split(split)
        if rows.n_images != main.n_images or not np.array_equal(rows.image_id, main.image_id):
            raise InputError(f"{sub.path}: its split {split!r} does not hold {store.path}'s images; {todo} again")
        emb.append(np.asarray(rows.image_emb))
    boxes = np.asarray(zarr.open_group(str(path), mode="r")[f"boxes/{split}"][...])
    if boxes.shape != (main.n_images, count, 5) or not np.isfinite(boxes).all():
        raise InputError(f"{path}: boxes/{split} has shape {boxes.shape}, expected ({main.n_images}, {count}, 5)")
    identity = {k: v for k, v in attrs.items() if k != "complete"}
    return ViewTargets(np.stack(emb), boxes.astype(np.float32), identity)
