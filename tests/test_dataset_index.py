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


# -- unpaired items ---------------------------------------------------------------------------------------
def unpaired_index() -> DatasetIndex:
    images = [("a", "a.jpg", "train"), ("b", "b.jpg", "test"), ("u", "u.jpg", "train"), ("c", "c.jpg", "train")]
    captions = [("a one", 0), ("b one", 1), ("c one", 3)]
    texts = [("text only 1", "train"), ("text only test", "test"), ("text only 2", "train")]
    return DatasetIndex.from_lists("toy", "imgs", images, captions, unpaired_texts=texts)


def test_paired_only_index_is_written_and_fingerprinted_as_before(tmp_path):
    """The fingerprint of a paired-only index is pinned (computed before unpaired items existed): features and
    image caches computed from it stay valid. Its files are the version-1 files, index.json key for key."""
    import json

    index = small_index()
    assert index.fingerprint == "39648c8a4e3b58591d5277a226aa248c35242d63f8a548796404e836b28641e6"
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.parquet", "images.parquet", "index.json"]
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["version"] == 1
    assert meta["splits"] == {"train": {"images": 2, "captions": 3}, "test": {"images": 2, "captions": 4}}


def test_unpaired_images_and_texts_in_split_views_and_storage(tmp_path):
    index = unpaired_index()
    train = index.split("train")
    assert train.image_id.tolist() == ["a", "u", "c"] and train.text_image.tolist() == [0, 2]
    assert train.unpaired_image.tolist() == [1]
    assert train.unpaired_text.tolist() == ["text only 1", "text only 2"]
    assert index.split("test").unpaired_text.tolist() == ["text only test"]
    index.save(tmp_path / "old")
    (tmp_path / "old" / "texts.parquet").rename(tmp_path / "texts.parquet")
    with pytest.raises(InputError, match="v2 index without texts.parquet"):
        DatasetIndex.load(tmp_path / "old")
    index.save(tmp_path / "index")
    loaded = DatasetIndex.load(tmp_path / "index")
    assert loaded.version == 2 and loaded.fingerprint == index.fingerprint
    assert loaded.unpaired_text.tolist() == index.unpaired_text.tolist()
    assert loaded.unpaired_text_split.tolist() == index.unpaired_text_split.tolist()
    # the unpaired texts are part of the content, and an index saved without them again drops texts.parquet
    fewer = DatasetIndex.from_lists("toy", "imgs", *_lists(index), unpaired_texts=[("text only 1", "train")])
    assert fewer.fingerprint != index.fingerprint
    none = DatasetIndex.from_lists("toy", "imgs", *_lists(index))
    none.save(tmp_path / "index")
    assert not (tmp_path / "index" / "texts.parquet").exists() and DatasetIndex.load(tmp_path / "index").version == 1
    assert index.drop_images([0]).split("train").unpaired_text.tolist() == ["text only 1", "text only 2"]
    with pytest.raises(InputError, match="unpaired texts in split 'val', which has no images"):
        DatasetIndex.from_lists("toy", "imgs", *_lists(index), unpaired_texts=[("x", "val")])


def _lists(index: DatasetIndex):
    images = list(zip(index.image_id.tolist(), index.image_path.tolist(), index.image_split.tolist()))
    return images, list(zip(index.caption_text.tolist(), index.caption_image.tolist()))
