"""clip-retrieval's layout: import-embeddings (matched to the index, every check of import-hdf5), export-embeddings,
the round trip bit for bit, and xarray opening the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.config import from_dict
from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.errors import InputError
from pipeline.store.clip_retrieval import export_embeddings, import_embeddings
from pipeline.store.features import UNPAIRED_TEXT, open_store
from pipeline.store.features_writer import l2_normalize_rows, write_store
from stages.cli import app

D = 6


def make_index(tmp_path: Path, unpaired: bool = True):
    """train: a (2 captions), b (none), c (1); test: d (1), e (2, equal); + a text without an image in train."""
    rows = [
        ("a.jpg", "a one", "train"),
        ("a.jpg", "a two", "train"),
        ("b.jpg", "", "train"),
        ("c.jpg", "c one", "train"),
        ("d.jpg", "d one", "test"),
        ("e.jpg", "same words", "test"),
        ("e.jpg", "same words", "test"),  # the same text twice: the i-th row with a text is the i-th caption
    ]
    if unpaired:
        rows.append(("", "only text", "train"))
    lines = [{"image": i, "caption": c, "split": s} for i, c, s in rows]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = from_dict(
        DatasetConfig, {"format": "jsonl", "annotations": str(tmp_path / "d.jsonl"), "name": "d"}, "prepare.dataset"
    )
    index = read_dataset(cfg)
    index.save(tmp_path / "index")
    return index


def make_store(tmp_path: Path, index, dtype="float16", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    splits = {}
    for s in index.splits:
        v = index.split(s)
        splits[s] = {
            "image_emb": rng.normal(size=(v.n_images, D)),
            "text_emb": rng.normal(size=(v.n_captions, D)),
            "text_image": v.text_image,
            "image_id": v.image_id.tolist(),
        }
        if len(v.unpaired_text):
            splits[s][UNPAIRED_TEXT] = rng.normal(size=(len(v.unpaired_text), D))
    path = tmp_path / "features.zarr"
    teacher = {"name": "clip:x", "logit_scale": 100.0}
    write_store(
        path,
        splits,
        teacher=teacher,
        dataset={"name": index.name, "fingerprint": index.fingerprint},
        dtype=dtype,
        chunk_rows=2,
    )
    return path


def arrays(path: Path) -> dict:
    store = open_store(path)
    out = {"attrs": {k: store.attrs[k] for k in ("teacher", "dataset", "dim", "dtype", "splits")}}
    for s in store.splits:
        sp = store.split(s)
        for key in ("image_emb", "text_emb", "unpaired_text_emb"):
            value = getattr(sp, key)
            out[s, key] = (
                None if value is None else np.asarray(value).view(np.uint16 if value.dtype == np.float16 else np.uint32)
            )
        out[s, "text_image"], out[s, "image_id"] = sp.text_image.tolist(), sp.image_id.tolist()
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_export_then_import_gives_the_store_back_bit_for_bit(tmp_path, dtype):
    index = make_index(tmp_path)
    store = make_store(tmp_path, index, dtype)
    r = CliRunner().invoke(
        app, ["export-embeddings", str(store), "--index", str(tmp_path / "index"), "--out", str(tmp_path / "emb")]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app,
        [
            "import-embeddings",
            str(tmp_path / "emb"),
            "--index",
            str(tmp_path / "index"),
            "--out",
            str(tmp_path / "back.zarr"),
        ],
    )
    assert r.exit_code == 0, r.output
    a, b = arrays(store), arrays(tmp_path / "back.zarr")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    assert open_store(tmp_path / "back.zarr").attrs["imported_from"] == {"dir": "emb", "format": "clip-retrieval"}


def test_the_export_is_clip_retrievals_layout_one_row_per_sample(tmp_path):
    index = make_index(tmp_path)
    store = open_store(make_store(tmp_path, index))
    export_embeddings(store.path, index, tmp_path / "emb")
    assert sorted(p.relative_to(tmp_path / "emb").as_posix() for p in (tmp_path / "emb").rglob("*.*")) == [
        "img_emb/img_emb_0.npy",
        "img_emb/img_emb_1.npy",
        "metadata/metadata_0.parquet",
        "metadata/metadata_1.parquet",
        "text_emb/text_emb_0.npy",
        "text_emb/text_emb_1.npy",
    ]
    meta = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").to_pydict()
    # train: captions a one, a two, c one; then b (no caption); then the text without an image
    assert meta["image_path"] == ["a.jpg", "a.jpg", "c.jpg", "b.jpg", None]
    assert meta["caption"] == ["a one", "a two", "c one", None, "only text"]
    img, txt = (
        np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy"),
        np.load(tmp_path / "emb" / "text_emb" / "text_emb_0.npy"),
    )
    train = store.split("train")
    assert np.array_equal(img[:4], np.asarray(train.image_emb)[[0, 0, 2, 1]]) and not img[4].any()
    assert np.array_equal(txt[:3], np.asarray(train.text_emb)) and not txt[3].any()
    assert np.array_equal(txt[4], np.asarray(train.unpaired_text_emb)[0])


def clip_retrieval_output(root: Path, parts: list[list[tuple]], dtype=np.float16, column="image_path") -> Path:
    """What `clip-retrieval inference` writes: per part, (image, caption, image row, text row) samples."""
    for name in ("img_emb", "text_emb", "metadata"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for k, samples in enumerate(parts):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", np.array([s[2] for s in samples], dtype))
        np.save(root / "text_emb" / f"text_emb_{k}.npy", np.array([s[3] for s in samples], dtype))
        table = {column: [s[0] for s in samples], "caption": [s[1] for s in samples], "url": [None] * len(samples)}
        pq.write_table(pa.table(table), root / "metadata" / f"metadata_{k}.parquet")
    return root


def test_import_of_other_tools_output_matches_paths_and_captions(tmp_path):
    index = make_index(tmp_path, unpaired=False)
    rng = np.random.default_rng(1)
    v = {name: rng.normal(size=D) for name in ("a", "b", "c", "d", "e", "t1", "t2", "tc", "td", "te", "te2")}
    root = tmp_path / "images"
    parts = [  # in another order than the index, across two parts, absolute and relative paths
        [("e.jpg", "same words", v["e"], v["te"]), (str(tmp_path / "a.jpg"), "a two", v["a"], v["t2"])],
        [("c.jpg", "c one", v["c"], v["tc"]), ("a.jpg", "a one", v["a"], v["t1"]), ("b.jpg", None, v["b"], v["t1"])],
        [("d.jpg", "d one", v["d"], v["td"]), ("e.jpg", "same words", v["e"], v["te2"])],
    ]
    clip_retrieval_output(root, parts)
    import_embeddings(root, tmp_path / "s.zarr", index, teacher={"name": "laion-clip"})
    store = open_store(tmp_path / "s.zarr", expect_fingerprint=index.fingerprint)
    expected = {
        ("train", "image_emb"): [v["a"], v["b"], v["c"]],
        ("train", "text_emb"): [v["t1"], v["t2"], v["tc"]],
        ("test", "image_emb"): [v["d"], v["e"]],
        ("test", "text_emb"): [v["td"], v["te"], v["te2"]],
    }
    for (split, key), rows in expected.items():
        want = l2_normalize_rows(np.array(rows, np.float16).astype(np.float32)).astype(np.float16)
        assert np.array_equal(np.asarray(getattr(store.split(split), key)), want), (split, key)
    assert store.teacher == {"name": "laion-clip"} and store.attrs["dtype"] == "float16"


def test_import_errors_name_file_and_row(tmp_path):
    index = make_index(tmp_path, unpaired=False)
    one = np.ones(D)
    full = [
        ("a.jpg", "a one", one, one),
        ("a.jpg", "a two", one, one),
        ("b.jpg", None, one, one),
        ("c.jpg", "c one", one, one),
        ("d.jpg", "d one", one, one),
        ("e.jpg", "same words", one, one),
        ("e.jpg", "same words", one, one),
    ]

    def attempt(samples, match=r".", **kw):
        root = tmp_path / f"emb{attempt.n}"
        attempt.n += 1
        clip_retrieval_output(root, [samples], **kw)
        with pytest.raises(InputError, match=match):
            import_embeddings(root, tmp_path / f"s{attempt.n}.zarr", index, teacher={"name": "t"})

    attempt.n = 0
    attempt(
        full + [("z.jpg", "zz", one, one)], r"metadata_0.parquet row 7: image_path 'z.jpg' is not an image of dataset d"
    )
    attempt(full[:2] + full[3:], r"image 'b.jpg' of split 'train' has no embedding")
    attempt(full[:1] + full[2:], r"caption 'a two' of image 'a.jpg' \(split 'train'\) has no embedding")
    attempt(full + [("c.jpg", "c one", one, one)], r"row 7: caption 'c one' is not a caption of image 'c.jpg'")
    attempt(
        full + [("c.jpg", None, -one, one)], r"row 7: image 'c.jpg' has another embedding here than in part 0 row 3"
    )
    nan = np.full(D, np.nan)
    attempt(
        full[:5] + [("e.jpg", "same words", nan, one)] * 2,
        r"emb\d+: test/image_emb row 1 is not finite \(NaN or inf\); fix or drop that row",  # the input, not the store
    )
    root = clip_retrieval_output(tmp_path / "short", [full])
    np.save(root / "text_emb" / "text_emb_0.npy", np.ones((5, D), np.float16))
    with pytest.raises(InputError, match="part 0 has 7 image rows, 5 text rows and 7 metadata rows"):
        import_embeddings(root, tmp_path / "x.zarr", index, teacher={"name": "t"})
    with pytest.raises(InputError, match="record no teacher; give its name"):
        import_embeddings(clip_retrieval_output(tmp_path / "ok", [full]), tmp_path / "y.zarr", index)


def test_webdataset_keys_match_shard_members(tmp_path):
    wds = pytest.importorskip("webdataset")
    import io

    from PIL import Image

    (tmp_path / "s").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    with wds.TarWriter(str(tmp_path / "s" / "00000.tar")) as sink:
        for key in ("000010", "000011"):
            sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"caption {key}"})
    cfg = {
        "format": "webdataset",
        "annotations": str(tmp_path / "s" / "00000.tar"),
        "default_split": "test",
        "name": "w",
    }
    index = read_dataset(from_dict(DatasetConfig, cfg, "prepare.dataset"))
    rows = np.eye(D)[:2]
    root = clip_retrieval_output(
        tmp_path / "emb",
        [[("000011", "caption 000011", rows[1], rows[0]), ("000010", "caption 000010", rows[0], rows[1])]],
        column="key",
    )
    import_embeddings(root, tmp_path / "w.zarr", index, teacher={"name": "t"})
    store = open_store(tmp_path / "w.zarr")
    assert store.split("test").image_id.tolist() == ["00000/000010.jpg", "00000/000011.jpg"]
    assert np.array_equal(np.asarray(store.split("test").image_emb, np.float32), rows)


def test_xarray_opens_a_split_of_the_store(tmp_path):
    xr = pytest.importorskip("xarray")
    index = make_index(tmp_path)
    path = make_store(tmp_path, index)
    ds = xr.open_zarr(path, group="train", consolidated=False)
    assert dict(ds.sizes) == {"image": 3, "caption": 3, "feature": D, "unpaired_text": 1}
    store = open_store(path).split("train")
    assert np.array_equal(ds["image_emb"].values, np.asarray(store.image_emb))
    assert ds["image_id"].values.tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds["text_image"].dims == ("caption",) and ds["text_emb"].dims == ("caption", "feature")
