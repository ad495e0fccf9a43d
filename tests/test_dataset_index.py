"""DatasetIndex: split views, dropping images, storage round trip, fingerprint stability."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.index import DatasetIndex, read_fingerprint
from pipeline.errors import InputError


def small_index(root="imgs") -> DatasetIndex:
    images = [("a", "a.jpg", "train"), ("b", "b.jpg", "test"), ("c", "c.jpg", "train"), ("d", "d.jpg", "test")]
    captions = [("a one", 0), ("b one", 1), ("b two", 1), ("c one", 2), ("d one", 3), ("a two", 0), ("d two", 3)]
    return DatasetIndex.from_lists("toy", root, images, captions)


def test_split_view_keeps_order_and_maps_captions_to_local_rows():
    test = small_index().split("test")
    assert test.image_id.tolist() == ["b", "d"]
    assert test.caption_text.tolist() == ["b one", "b two", "d one", "d two"]
    assert test.text_image.tolist() == [0, 0, 1, 1]
    assert test.text_image.dtype == np.int32
    assert test.image_path.tolist() == [str(Path("imgs/b.jpg")), str(Path("imgs/d.jpg"))]
    train = small_index().split("train")
    # every caption's local image row names the same image as its global row
    for text, local in zip(train.caption_text, train.text_image):
        assert text.split()[0] == train.image_id[local]


def test_splits_are_ordered_and_unknown_split_is_refused():
    index = small_index()
    assert index.splits == ("train", "test")
    with pytest.raises(InputError, match="no split 'val'"):
        index.split("val")


def test_drop_images_removes_their_captions_and_renumbers():
    dropped = small_index().drop_images([1])
    assert dropped.image_id.tolist() == ["a", "c", "d"]
    assert dropped.caption_text.tolist() == ["a one", "c one", "d one", "a two", "d two"]
    assert dropped.caption_image.tolist() == [0, 1, 2, 0, 2]


def test_save_load_round_trip_and_fingerprint(tmp_path):
    index = small_index()
    index.save(tmp_path / "index")
    loaded = DatasetIndex.load(tmp_path / "index")
    assert loaded.fingerprint == index.fingerprint == read_fingerprint(tmp_path / "index")
    for name in ("image_id", "image_path", "image_split", "caption_text", "caption_image"):
        assert getattr(loaded, name).tolist() == getattr(index, name).tolist()


def test_fingerprint_depends_on_content_not_on_root():
    base = small_index().fingerprint
    assert small_index(root="/elsewhere").fingerprint == base
    images = [("a", "a.jpg", "train"), ("b", "b.jpg", "test"), ("c", "c.jpg", "train"), ("d", "d.jpg", "test")]
    edited = DatasetIndex.from_lists(
        "toy",
        "imgs",
        images,
        [("a one!", 0), ("b one", 1), ("b two", 1), ("c one", 2), ("d one", 3), ("a two", 0), ("d two", 3)],
    )
    assert edited.fingerprint != base
    # moving a caption to another image changes it too, even with the same texts
    moved = DatasetIndex.from_lists(
        "toy",
        "imgs",
        images,
        [("a one", 2), ("b one", 1), ("b two", 1), ("c one", 2), ("d one", 3), ("a two", 0), ("d two", 3)],
    )
    assert moved.fingerprint != base


def test_duplicate_ids_and_bad_rows_are_refused():
    with pytest.raises(InputError, match="'a' appears more than once"):
        DatasetIndex.from_lists("toy", ".", [("a", "1.jpg", "train"), ("a", "2.jpg", "train")], [])
    with pytest.raises(InputError, match="outside"):
        DatasetIndex.from_lists("toy", ".", [("a", "1.jpg", "train")], [("x", 3)])


def test_load_refuses_a_hand_edited_index(tmp_path):
    small_index().save(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "captions.parquet")
    texts = table["text"].to_pylist()
    texts[0] = "edited"
    pq.write_table(table.set_column(0, "text", pa.array(texts)), tmp_path / "captions.parquet")
    with pytest.raises(InputError, match="fingerprint"):
        DatasetIndex.load(tmp_path)
