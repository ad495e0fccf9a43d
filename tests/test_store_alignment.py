"""pipeline/store/alignment.py: the one answer distill and evaluate share to "which index rows does this store
split hold", against a naive loop over image ids, and its refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.store.alignment import align_store_split


def _view(n_images: int, captions_per_image: list[int]) -> SimpleNamespace:
    text_image = np.repeat(np.arange(n_images), captions_per_image).astype(np.int32)
    return SimpleNamespace(
        name="test",
        image_id=np.array([f"img{i}" for i in range(n_images)], dtype=object),
        caption_text=np.array([f"caption {k} of img{i}" for k, i in enumerate(text_image)], dtype=object),
        text_image=text_image,
        n_images=n_images,
        n_captions=len(text_image),
    )


def _store(view: SimpleNamespace, keep: list[int]) -> SimpleNamespace:
    """What extract writes when it skips every image not in `keep`: the kept images and their captions."""
    new_row = {r: i for i, r in enumerate(keep)}
    text_image = [new_row[int(r)] for r in view.text_image if int(r) in new_row]
    return SimpleNamespace(
        image_id=view.image_id[keep],
        text_image=np.array(text_image, dtype=np.int32),
        n_images=len(keep),
        n_captions=len(text_image),
    )


def _naive(view: SimpleNamespace, store: SimpleNamespace) -> tuple[list[int], list[int]]:
    """Index row of each store image; index caption of each store caption (captions of kept images, in order)."""
    ids = list(view.image_id)
    rows = [ids.index(i) for i in store.image_id]
    captions = [c for c in range(view.n_captions) if int(view.text_image[c]) in rows]
    return rows, captions


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5], [0, 2, 3, 5], [1], [1, 2, 3, 4, 5]])
def test_alignment_equals_a_naive_match_by_image_id(keep):
    view = _view(6, [2, 0, 3, 1, 1, 2])  # image 1 has no caption (an unpaired image)
    store = _store(view, keep)
    got = align_store_split(view, store, "store")
    rows, captions = _naive(view, store)
    if len(keep) == view.n_images:
        assert got.image_rows is None  # the common case: every row, no gather
    else:
        assert got.image_rows.tolist() == rows
    assert got.caption_rows.tolist() == captions
    assert np.array_equal(got.text_image, store.text_image) and got.text_image.dtype == np.int64
    assert list(view.caption_text[got.caption_rows]) == [view.caption_text[c] for c in captions]


def test_alignment_refuses_a_store_of_other_rows():
    view = _view(4, [1, 1, 1, 1])
    with pytest.raises(InputError, match=r"store: the feature store's split 'test' has image 'other'"):
        align_store_split(
            view, SimpleNamespace(**{**vars(_store(view, [0, 1])), "image_id": np.array(["img0", "other"])}), "store"
        )
    with pytest.raises(InputError, match="not a subset of the index split in index order"):
        align_store_split(view, _store(view, [2, 0]), "store")
    fewer = _store(view, [0, 1, 2])
    fewer.text_image, fewer.n_captions = fewer.text_image[:2], 2  # a caption of a kept image is missing
    with pytest.raises(InputError, match=r"\(3 images, 2 captions\) does not line up with the dataset index"):
        align_store_split(view, fewer, "store")
