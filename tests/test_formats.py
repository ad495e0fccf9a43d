"""The readers of prepare.dataset.format coco, folder and parquet, against hand-written expectations."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.image_source import ImageRef, open_image
from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.errors import ConfigError, InputError


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def config(**raw) -> DatasetConfig:
    return from_dict(DatasetConfig, raw, "prepare.dataset")


def rows(index) -> list[tuple[str, str, str]]:
    return list(zip(index.image_id.tolist(), index.image_path.tolist(), index.image_split.tolist()))


def captions(index) -> list[tuple[str, str]]:
    return [(t, index.image_id[r]) for t, r in zip(index.caption_text.tolist(), index.caption_image.tolist())]


# -- coco -------------------------------------------------------------------------------------------
def coco(path: Path, images: list, annotations: list) -> Path:
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations, "licenses": []}))
    return path


def test_coco_captions_per_split_file_with_split_image_directories(tmp_path):
    for d in ("train2017", "val2017"):
        (tmp_path / d).mkdir()
    train = coco(
        tmp_path / "captions_train2017.json",
        [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        [
            {"id": 1, "image_id": 25, "caption": "a giraffe"},
            {"id": 2, "image_id": 9, "caption": "a plate"},
            {"id": 3, "image_id": 25, "caption": "tall animal"},
        ],
    )
    val = coco(
        tmp_path / "captions_val2017.json",
        [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
        [{"id": 4, "image_id": 139, "caption": "a living room"}],
    )
    index = read_dataset(
        config(
            format="coco",
            annotations={"train": str(train), "val": str(val)},
            image_root={"train": str(tmp_path / "train2017"), "val": str(tmp_path / "val2017")},
        )
    )
    assert index.image_root == tmp_path
    assert rows(index) == [
        ("train2017/000000000009.jpg", "train2017/000000000009.jpg", "train"),
        ("train2017/000000000025.jpg", "train2017/000000000025.jpg", "train"),
        ("val2017/000000000139.jpg", "val2017/000000000139.jpg", "val"),
        ("val2017/000000000285.jpg", "val2017/000000000285.jpg", "val"),  # no annotation: unpaired
    ]
    assert captions(index) == [
        ("a giraffe", "train2017/000000000025.jpg"),
        ("a plate", "train2017/000000000009.jpg"),
        ("tall animal", "train2017/000000000025.jpg"),
        ("a living room", "val2017/000000000139.jpg"),
    ]
    assert index.split("val").unpaired_image.tolist() == [1]


def test_coco_one_file_needs_a_split_and_its_errors_name_the_item(tmp_path):
    f = coco(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": "x"}])
    with pytest.raises(InputError, match=r"c.json images\[0\]: the file names no split"):
        read_dataset(config(format="coco", annotations=str(f)))
    assert rows(read_dataset(config(format="coco", annotations=str(f), default_split="test"))) == [
        ("a.jpg", "a.jpg", "test")
    ]
    cases = [
        ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 2, "caption": "x"}], r"annotations\[0\]: image_id 2 is not"),
        ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": "  "}], r"annotations\[0\]: empty caption"),
        (
            [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
            [],
            r"images\[1\]: image id 1 is listed twice",
        ),
        (
            [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}],
            [],
            r"images\[1\]: image 'a.jpg' is listed twice",
        ),
        ([{"id": 1, "filename": "a.jpg"}], [], r"images\[0\]: no 'file_name'"),
    ]
    for images, anns, message in cases:
        coco(f, images, anns)
        with pytest.raises(InputError, match=message):
            read_dataset(config(format="coco", annotations=str(f), default_split="test"))


def test_an_image_root_mapping_is_for_coco_only():
    with pytest.raises(ConfigError, match="for format coco only"):
        config(format="jsonl", annotations={"train": "a"}, image_root={"train": "x"})


# -- folder -----------------------------------------------------------------------------------------
def test_folder_pairs_each_image_with_its_txt_lines(tmp_path):
    d = tmp_path / "shots"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for name in ("b.jpg", "a.png", "sub/c.webp", ".hidden/x.jpg", "notes.md"):
        (d / name).write_bytes(b"")
    (d / "b.txt").write_text("a dog\n\n  a brown dog on grass\n")
    (d / "sub" / "c.txt").write_text("one caption")
    index = read_dataset(config(format="folder", annotations=str(d), default_split="train"))
    assert index.image_root == d
    assert rows(index) == [
        ("a.png", "a.png", "train"),
        ("b.jpg", "b.jpg", "train"),
        ("sub/c.webp", "sub/c.webp", "train"),
    ]
    assert captions(index) == [("a dog", "b.jpg"), ("  a brown dog on grass", "b.jpg"), ("one caption", "sub/c.webp")]
    assert index.split("train").unpaired_image.tolist() == [0]  # a.png has no .txt


def test_folder_errors(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "lonely.txt").write_text("x")
    with pytest.raises(InputError, match="lonely.txt: a caption file without an image"):
        read_dataset(config(format="folder", annotations=str(d), default_split="train"))
    (d / "lonely.txt").unlink()
    (d / "a.txt").write_text("\n \n")
    with pytest.raises(InputError, match="a.txt: empty caption file"):
        read_dataset(config(format="folder", annotations=str(d), default_split="train"))
    (d / "a.txt").write_text("x")
    (d / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="a.jpg and a.png share one name"):
        read_dataset(config(format="folder", annotations=str(d), default_split="train"))
    with pytest.raises(InputError, match="is a file, not a directory"):
        read_dataset(config(format="folder", annotations=str(d / "a.txt"), default_split="train"))


def test_folder_mapping_roots_at_the_common_parent(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "x.jpg").write_bytes(b"")
    index = read_dataset(
        config(format="folder", annotations={"train": str(tmp_path / "train"), "test": str(tmp_path / "test")})
    )
    assert rows(index) == [("train/x.jpg", "train/x.jpg", "train"), ("test/x.jpg", "test/x.jpg", "test")]


# -- parquet ----------------------------------------------------------------------------------------
def test_parquet_with_image_paths_caption_lists_and_splits(tmp_path):
    table = pa.table(
        {
            "file": ["a.jpg", "b.jpg", None, "a.jpg"],
            "texts": [["one", "two"], [], ["text only"], ["three"]],
            "split": ["train", "train", "train", "train"],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    index = read_dataset(
        config(
            format="parquet",
            annotations=str(tmp_path / "d.parquet"),
            parquet={"image_column": "file", "caption_column": "texts"},
        )
    )
    assert rows(index) == [("a.jpg", "a.jpg", "train"), ("b.jpg", "b.jpg", "train")]
    assert captions(index) == [("one", "a.jpg"), ("two", "a.jpg"), ("three", "a.jpg")]
    assert index.unpaired_text.tolist() == ["text only"] and index.image_member is None


def test_parquet_with_image_bytes_reads_them_in_place(tmp_path):
    """Hugging Face datasets' image struct and plain binary; ids <file>/<row> or from id_column; globbed files."""
    (tmp_path / "data").mkdir()
    structs = [{"bytes": png_bytes(10), "path": "x.png"}, {"bytes": png_bytes(20), "path": "y.png"}]
    pq.write_table(
        pa.table({"image": structs, "caption": ["first", None]}),
        tmp_path / "data" / "train-0.parquet",
        row_group_size=1,
    )
    pq.write_table(pa.table({"image": [png_bytes(30)], "caption": ["third"]}), tmp_path / "data" / "train-1.parquet")
    index = read_dataset(
        config(
            format="parquet",
            annotations={"train": str(tmp_path / "data" / "train-*.parquet")},
            image_root=str(tmp_path),
        )
    )
    assert rows(index) == [
        ("data/train-0/0", "data/train-0.parquet", "train"),
        ("data/train-0/1", "data/train-0.parquet", "train"),
        ("data/train-1/0", "data/train-1.parquet", "train"),
    ]
    assert captions(index) == [("first", "data/train-0/0"), ("third", "data/train-1/0")]
    refs = [index.image_ref(r) for r in range(3)]
    assert refs[1] == ImageRef(str(tmp_path / "data/train-0.parquet"), "parquet", "image", 1, -1)
    for ref, value in zip(refs, (10, 20, 30)):
        with open_image(ref) as im:
            assert np.asarray(im.convert("RGB"))[0, 0].tolist() == [value, 255 - value, 7]
    with_ids = read_dataset(
        config(
            format="parquet",
            annotations=str(tmp_path / "data" / "train-1.parquet"),
            default_split="test",
            parquet={"id_column": "caption"},
        )
    )
    assert with_ids.image_id.tolist() == ["third"]


def test_parquet_errors_name_file_and_column(tmp_path):
    pq.write_table(pa.table({"img": ["a.jpg"], "caption": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d.parquet: no column 'image' \(it has: img, caption\)"):
        read_dataset(config(format="parquet", annotations=str(tmp_path / "d.parquet"), default_split="train"))
    pq.write_table(pa.table({"image": [1], "caption": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match="column 'image' is int64; expected a path"):
        read_dataset(config(format="parquet", annotations=str(tmp_path / "d.parquet"), default_split="train"))
    pq.write_table(pa.table({"image": [b"1", b"2"], "caption": ["x", "y"], "k": ["s", "s"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"row 1: image 's' is listed twice \(also at .* row 0\)"):
        read_dataset(
            config(
                format="parquet",
                annotations=str(tmp_path / "d.parquet"),
                default_split="train",
                parquet={"id_column": "k"},
            )
        )
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet: not a readable parquet file"):
        read_dataset(config(format="parquet", annotations=str(tmp_path / "bad.parquet"), default_split="train"))
    with pytest.raises(InputError, match="nothing-\\*.parquet matches no file"):
        read_dataset(config(format="parquet", annotations=str(tmp_path / "nothing-*.parquet"), default_split="train"))
