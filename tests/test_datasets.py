"""Dataset readers: Karpathy (COCO / Flickr30K), DSMD, JSONL, CSV; the fingerprint; one-line errors."""

import json
from pathlib import Path

import pytest

from pipeline.config import from_dict
from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.errors import ConfigError, InputError


def coco_file(tmp_path, edit=None) -> Path:
    """A COCO-style Karpathy file: images with 5, 6 and 7 captions, splits train/restval/val/test."""
    images = []
    for i, (split, n, folder) in enumerate(
        [
            ("train", 5, "train2014"),
            ("restval", 6, "val2014"),
            ("val", 7, "val2014"),
            ("test", 5, "val2014"),
            ("test", 7, "val2014"),
            ("restval", 5, "val2014"),
        ]
    ):
        sentences = [
            {"raw": f"image {i} caption {k}.", "imgid": i, "sentid": 10 * i + k, "tokens": []} for k in range(n)
        ]
        images.append(
            {
                "filepath": folder,
                "filename": f"COCO_{folder}_{i:012d}.jpg",
                "imgid": i,
                "cocoid": 1000 + i,
                "split": split,
                "sentences": sentences,
                "sentids": [],
            }
        )
    data = {"images": images, "dataset": "coco"}
    if edit is not None:
        edit(data)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def flickr_file(tmp_path) -> Path:
    images = [
        {
            "filename": f"{1000 + i}.jpg",
            "imgid": i,
            "split": s,
            "sentences": [{"raw": f"flickr {i} #{k}", "imgid": i} for k in range(5)],
        }
        for i, s in enumerate(["train", "train", "val", "test"])
    ]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def cfg(path, **kw) -> DatasetConfig:
    return DatasetConfig(annotations=path, image_root=kw.pop("image_root", path.parent), **kw)


# -- Karpathy ----------------------------------------------------------------------------------------
def test_coco_restval_into_train_and_varying_caption_counts(tmp_path):
    index = read_dataset(cfg(coco_file(tmp_path), name="coco"))
    assert index.name == "coco"
    assert index.splits == ("train", "val", "test")
    assert index.image_split.tolist() == ["train", "train", "val", "test", "test", "train"]
    # id = filepath/filename, the file's path relative to the image root
    assert index.image_id[1] == "val2014/COCO_val2014_000000000001.jpg"
    assert index.image_abspath(0) == tmp_path / "train2014" / "COCO_train2014_000000000000.jpg"
    train, val, test = index.split("train"), index.split("val"), index.split("test")
    assert (train.n_images, train.n_captions) == (3, 5 + 6 + 5)
    assert (val.n_images, val.n_captions) == (1, 7)
    assert (test.n_images, test.n_captions) == (2, 12)
    assert test.text_image.tolist() == [0] * 5 + [1] * 7
    assert test.caption_text[5] == "image 4 caption 0."


def test_restval_kept_or_dropped_and_split_filter(tmp_path):
    path = coco_file(tmp_path)
    kept = read_dataset(cfg(path, restval="restval"))
    assert kept.splits == ("train", "val", "test", "restval")
    assert kept.split("restval").n_captions == 11
    dropped = read_dataset(cfg(path, restval="drop"))
    assert dropped.n_images == 4 and "restval" not in dropped.splits
    assert dropped.n_captions == 5 + 7 + 5 + 7
    only_test = read_dataset(cfg(path, splits=("test",)))
    assert only_test.splits == ("test",) and only_test.n_captions == 12
    with pytest.raises(InputError, match="no images in split 'restval'"):
        read_dataset(cfg(path, splits=("test", "restval")))


def test_flickr_ids_are_filenames(tmp_path):
    index = read_dataset(cfg(flickr_file(tmp_path)))
    assert index.image_id.tolist() == ["1000.jpg", "1001.jpg", "1002.jpg", "1003.jpg"]
    assert index.split("train").n_captions == 10
    assert index.image_abspath(3) == tmp_path / "1003.jpg"


def test_fingerprint_tracks_content_not_location(tmp_path):
    path = coco_file(tmp_path)
    a = read_dataset(cfg(path)).fingerprint
    assert read_dataset(cfg(path)).fingerprint == a  # nothing changed
    other_root = tmp_path / "elsewhere"
    other_root.mkdir()
    assert read_dataset(cfg(path, image_root=other_root)).fingerprint == a  # dataset moved
    path.write_text(path.read_text().replace("image 3 caption 2.", "image 3 caption 2!"))
    assert read_dataset(cfg(path)).fingerprint != a  # one caption changed
    assert read_dataset(cfg(path, restval="restval")).fingerprint != read_dataset(cfg(path)).fingerprint


def _set(path, value):
    def edit(data):
        node = data
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set(["images", 2, "sentences", 3, "raw"], "   "),
            r"images\[2\] \(COCO_val2014_000000000002.jpg\) sentences\[3\]: "
            r"empty caption for image 'val2014/COCO_val2014_000000000002.jpg'",
        ),
        (_set(["images", 1, "sentences", 0, "imgid"], 99), r"images\[1\].*sentences\[0\]: caption points at imgid 99"),
        (
            _set(["images", 4, "filename"], "COCO_val2014_000000000003.jpg"),
            r"images\[4\].*listed twice \(also at .*images\[3\]",
        ),
        (_set(["images", 0, "split"], "training"), r"images\[0\].*split 'training' is not one of"),
        (_set(["images", 0, "sentences"], None), r"images\[0\].*no 'sentences' list"),
        (_set(["images", 5, "sentences", 1, "raw"], 5), r"images\[5\].*sentences\[1\]: caption must be a string"),
    ],
)
def test_karpathy_bad_items_name_the_item(tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        read_dataset(cfg(coco_file(tmp_path, edit)))


def test_malformed_json_missing_files(tmp_path):
    bad = tmp_path / "dataset_coco.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",\n  }]}')
    with pytest.raises(InputError, match=r"dataset_coco.json line 3 column 3: malformed JSON"):
        read_dataset(cfg(bad))
    with pytest.raises(InputError, match=r"annotations: .*nope.json not found"):
        read_dataset(cfg(tmp_path / "nope.json", image_root=tmp_path))
    with pytest.raises(InputError, match=r"image_root: .*missing_dir not found"):
        read_dataset(cfg(flickr_file(tmp_path), image_root=tmp_path / "missing_dir"))


# -- row formats -------------------------------------------------------------------------------------
def test_dsmd_one_file_per_split(tmp_path):
    (tmp_path / "train.json").write_text(
        json.dumps(
            [
                {"filename": "a.jpg", "description": "a cat"},
                {"filename": "b.jpg", "description": "a dog"},
                {"filename": "a.jpg", "description": "a cat on a mat"},
            ]
        )
    )
    (tmp_path / "test.json").write_text(json.dumps([{"filename": "c.jpg", "description": ["a bird", "a small bird"]}]))
    index = read_dataset(
        DatasetConfig(format="dsmd", annotations={"train": tmp_path / "train.json", "test": tmp_path / "test.json"})
    )
    assert index.image_root == tmp_path  # default: the annotations' directory
    assert index.image_id.tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert index.image_split.tolist() == ["train", "train", "test"]
    assert index.caption_image.tolist() == [0, 1, 0, 2, 2]


def test_dsmd_rows_need_a_split(tmp_path):
    f = tmp_path / "all.json"
    f.write_text(
        json.dumps(
            [{"filename": "a.jpg", "description": "x", "split": "test"}, {"filename": "b.jpg", "description": "y"}]
        )
    )
    with pytest.raises(InputError, match=r"all.json \[1\]: row has no split"):
        read_dataset(DatasetConfig(format="dsmd", annotations=f))
    index = read_dataset(DatasetConfig(format="dsmd", annotations=f, default_split="train"))
    assert index.image_split.tolist() == ["test", "train"]
    f.write_text(json.dumps([{"filename": "a.jpg", "description": "x", "split": "test"}]))
    with pytest.raises(InputError, match=r"\[0\]: row says split 'test' but its file is the 'train' file"):
        read_dataset(DatasetConfig(format="dsmd", annotations={"train": f}))


def test_jsonl_and_csv_same_index(tmp_path):
    rows = [
        ("img/a.jpg", "a red car, parked", "train"),
        ("img/b.jpg", 'a "quoted" word', "test"),
        ("img/a.jpg", "another caption", "train"),
    ]
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"image": i, "caption": c, "split": s}) for i, c, s in rows) + "\n\n"
    )
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["caption", "image", "split"])
        w.writerows([(c, i, s) for i, c, s in rows])
    a = read_dataset(DatasetConfig(format="jsonl", annotations=tmp_path / "d.jsonl", name="mine"))
    b = read_dataset(DatasetConfig(format="csv", annotations=tmp_path / "d.csv", name="mine"))
    assert a.fingerprint == b.fingerprint
    assert a.image_id.tolist() == ["img/a.jpg", "img/b.jpg"]
    assert a.caption_text.tolist() == [c for _, c, _ in rows]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "b.jpg", "caption": " ", "split": "train"}',
            r"d.jsonl line 2: empty caption for image 'b.jpg'",
        ),
        (
            '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "a.jpg", "caption": "y", "split": "test"}',
            r"d.jsonl line 2: image 'a.jpg' is in split 'test' here but in split 'train' at .*d.jsonl line 1",
        ),
        (
            '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "b.jpg" "caption": "y"}',
            r"d.jsonl line 2 column 19: malformed JSON",
        ),
        ('{"caption": "x", "split": "train"}', r"d.jsonl line 1: no image path"),
        ('{"image": "../a.jpg", "caption": "x", "split": "train"}', r"line 1: image path '../a.jpg' points outside"),
        ('{"image": "a.jpg", "split": "train"}', r"d.jsonl line 1: no 'caption'"),
    ],
)
def test_jsonl_bad_rows(tmp_path, text, message):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_dataset(DatasetConfig(format="jsonl", annotations=tmp_path / "d.jsonl"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,text\na.jpg,x\n", r"d.csv line 1: no 'caption' column"),
        ("image,caption\na.jpg,x,extra\n", r"d.csv line 2: 3 fields, the header has 2"),
        ("image,caption\na.jpg,   \n", r"d.csv line 2: empty caption for image 'a.jpg'"),
        ('image,caption\na.jpg,"unterminated\n', r"d.csv line \d+: malformed CSV"),
        ("", r"d.csv: empty CSV file"),
    ],
)
def test_csv_bad_rows(tmp_path, text, message):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_dataset(DatasetConfig(format="csv", annotations=tmp_path / "d.csv", default_split="train"))


def test_dataset_config_from_params(tmp_path):
    c = from_dict(
        DatasetConfig,
        {"format": "dsmd", "annotations": {"train": "t.json", "test": "s.json"}, "splits": ["test"]},
        "prepare.dataset",
    )
    assert c.annotations == {"train": Path("t.json"), "test": Path("s.json")} and c.splits == ("test",)
    with pytest.raises(ConfigError, match=r"prepare.dataset: annotations: a Karpathy split file is one file"):
        from_dict(DatasetConfig, {"annotations": {"train": "t.json"}}, "prepare.dataset")
    with pytest.raises(
        ConfigError,
        match=r"prepare.dataset.restval: 'keep' is not one of the allowed values: "
        r"'train', 'restval', 'drop'",
    ):
        from_dict(DatasetConfig, {"annotations": "a.json", "restval": "keep"}, "prepare.dataset")
    with pytest.raises(ConfigError, match=r"prepare.dataset.annotations"):
        from_dict(DatasetConfig, {"annotations": 3}, "prepare.dataset")


# -- unpaired items: images without captions, texts without images, a folder of unlabelled images ---------
def test_karpathy_empty_sentences_is_an_unpaired_image(tmp_path):
    index = read_dataset(cfg(coco_file(tmp_path, _set(["images", 3, "sentences"], []))))
    test = index.split("test")
    assert test.image_id.tolist() == ["val2014/COCO_val2014_000000000003.jpg", "val2014/COCO_val2014_000000000004.jpg"]
    assert test.unpaired_image.tolist() == [0] and test.text_image.tolist() == [1] * 7
    assert index.n_unpaired_texts == 0


def test_jsonl_and_csv_empty_fields_are_unpaired_items(tmp_path):
    rows = [
        ("a.jpg", "a caption of a", "train"),
        ("b.jpg", "", "train"),  # unpaired image
        ("", "a text without an image", "train"),  # unpaired text
        ("c.jpg", "c in test", "test"),
        ("", "a test text", "test"),
    ]
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"image": i if i else None, "caption": c, "split": s}) for i, c, s in rows)
    )
    (tmp_path / "d.csv").write_text("image,caption,split\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows))
    a = read_dataset(DatasetConfig(format="jsonl", annotations=tmp_path / "d.jsonl"))
    b = read_dataset(DatasetConfig(format="csv", annotations=tmp_path / "d.csv"))
    assert a.fingerprint == b.fingerprint
    train = a.split("train")
    assert train.image_id.tolist() == ["a.jpg", "b.jpg"] and train.unpaired_image.tolist() == [1]
    assert train.caption_text.tolist() == ["a caption of a"] and train.text_image.tolist() == [0]
    assert train.unpaired_text.tolist() == ["a text without an image"]
    assert a.split("test").unpaired_text.tolist() == ["a test text"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"image": "", "caption": "", "split": "train"}', r"line 1: row has neither an image nor a caption"),
        ('{"image": null, "caption": "  ", "split": "train"}', r"line 1: empty caption for a row without an image"),
        ('{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "", "caption": "y", "split": "val"}',
         r"unpaired texts in split 'val', which has no images"),
    ],
)  # fmt: skip
def test_unpaired_rows_that_are_still_refused(tmp_path, text, message):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_dataset(DatasetConfig(format="jsonl", annotations=tmp_path / "d.jsonl"))


def test_dsmd_has_no_notation_for_unpaired_items(tmp_path):
    f = tmp_path / "all.json"
    f.write_text(json.dumps([{"description": "x", "split": "train"}]))
    with pytest.raises(InputError, match=r"\[0\]: no image path"):
        read_dataset(DatasetConfig(format="dsmd", annotations=f))
    f.write_text(json.dumps([{"filename": "a.jpg", "description": "", "split": "train"}]))
    with pytest.raises(InputError, match=r"\[0\]: empty caption for image 'a.jpg'"):
        read_dataset(DatasetConfig(format="dsmd", annotations=f))


def test_unlabelled_folder_adds_unpaired_images_in_sorted_order(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "t.jpg", "caption": "y", "split": "test"}'
    )
    extra = tmp_path / "more"
    for name in ("z.png", "sub/b.JPG", "sub/a.jpeg", "notes.txt", ".hidden/h.png", "sub/.x.png"):
        (extra / name).parent.mkdir(parents=True, exist_ok=True)
        (extra / name).write_bytes(b"")
    (tmp_path / "a.jpg").write_bytes(b"")
    base = DatasetConfig(format="jsonl", annotations=tmp_path / "d.jsonl")
    index = read_dataset(DatasetConfig(**{**base.__dict__, "unlabelled_images": extra}))
    train = index.split("train")
    assert train.image_id.tolist() == ["a.jpg", "more/sub/a.jpeg", "more/sub/b.JPG", "more/z.png"]
    assert train.unpaired_image.tolist() == [1, 2, 3]
    # the image root itself as the folder: a.jpg (captioned, same split) stays one image with its caption
    again = read_dataset(DatasetConfig(**{**base.__dict__, "unlabelled_images": tmp_path}))
    assert again.split("train").image_id.tolist() == ["a.jpg", "more/sub/a.jpeg", "more/sub/b.JPG", "more/z.png"]
    # into another split: a test image must never become training data
    (tmp_path / "t.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"unlabelled_images: .* \(t.jpg\): image 't.jpg' is in split 'train'"):
        read_dataset(DatasetConfig(**{**base.__dict__, "unlabelled_images": tmp_path}))
    with pytest.raises(InputError, match=r"unlabelled_images: .*nowhere not found"):
        read_dataset(DatasetConfig(**{**base.__dict__, "unlabelled_images": tmp_path / "nowhere"}))
    with pytest.raises(ConfigError, match="unlabelled_split"):
        from_dict(DatasetConfig, {"annotations": "x", "unlabelled_images": "d", "splits": ["test"]}, "prepare.dataset")


@pytest.mark.parametrize("fmt", ["karpathy", "csv", "jsonl"])
def test_an_image_path_with_a_nul_byte_is_one_line_naming_the_row(tmp_path, fmt):
    name = "b\0.jpg"
    text = {
        "karpathy": json.dumps({"images": [{"filename": name, "split": "train", "sentences": [{"raw": "x"}]}]}),
        "csv": "image,caption,split\n" + f"{name},x,train\n",
        "jsonl": json.dumps({"image": name, "caption": "x", "split": "train"}) + "\n",
    }[fmt]
    path = tmp_path / f"ann.{'json' if fmt == 'karpathy' else fmt}"
    path.write_text(text)
    with pytest.raises(InputError, match=r"image path 'b\\x00\.jpg' holds a NUL byte, which no file name can$"):
        read_dataset(DatasetConfig(annotations=path, image_root=tmp_path, format=fmt))
