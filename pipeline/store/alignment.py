"""Which rows of the dataset index a feature-store split holds: one answer for distill and evaluate.

A store normally holds every image and caption of an index split, in index order. With
`extract.on_bad_image: skip` it lacks the images extract could not read, with their captions; the rows it
keeps are matched by image id and must stay in index order, and the captions of the kept images must be the
store's, in the same order. Anything else is a store made from another index (or edited by hand): one line
that says to rerun extract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InputError


@dataclass(frozen=True)
class Alignment:
    """Where a store split's rows are in the index split."""

    image_rows: np.ndarray | None  # int64 [N]: the index (and image cache) row of each store image; None: the same
    caption_rows: np.ndarray  # int64 [M]: the index caption of each store caption
    text_image: np.ndarray  # int64 [M]: the store's text_image (image row of each caption, store order)


def align_store_split(view: Any, store_split: Any, where: str) -> Alignment:
    """Match the index split `view` (a SplitView) with `store_split` (a StoreSplit) through image ids."""
    store_text_image = np.asarray(store_split.text_image, dtype=np.int64)
    store_ids = store_split.image_id
    if store_split.n_images == view.n_images and np.array_equal(store_ids, view.image_id):
        rows, caption_rows = None, np.arange(view.n_captions, dtype=np.int64)
        text_image = np.asarray(view.text_image, dtype=np.int64)
    else:  # the store skipped bad images (extract.on_bad_image: skip): keep the same ones here
        position = {str(image_id): i for i, image_id in enumerate(view.image_id.tolist())}
        rows = np.array([position.get(str(i), -1) for i in store_ids.tolist()], dtype=np.int64)
        if (rows < 0).any():
            missing = str(store_ids[int(np.flatnonzero(rows < 0)[0])])
            raise InputError(
                f"{where}: the feature store's split {view.name!r} has image {missing!r} that the dataset index "
                "lacks; rerun `kdpipe extract`"
            )
        if (np.diff(rows) <= 0).any():
            raise InputError(
                f"{where}: the feature store's images are not a subset of the index split in index order; "
                "rerun `kdpipe extract`"
            )
        local = np.full(view.n_images, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        caption_rows = np.flatnonzero(local[view.text_image] >= 0)
        text_image = local[view.text_image[caption_rows]]
    if len(caption_rows) != store_split.n_captions or not np.array_equal(text_image, store_text_image):
        raise InputError(
            f"{where}: the feature store's split {view.name!r} ({store_split.n_images} images, "
            f"{store_split.n_captions} captions) does not line up with the dataset index ({view.n_images} images, "
            f"{view.n_captions} captions, {len(caption_rows)} of them of the store's images); rerun `kdpipe extract`"
        )
    return Alignment(rows, caption_rows, store_text_image)


__all__ = ["Alignment", "align_store_split"]
