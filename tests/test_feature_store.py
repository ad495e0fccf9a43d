"""Feature store v1: the one-shot writer, the memory-mapped reader and every validation error."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import InputError
from pipeline.store.chunk_files import ChunkedRows
from pipeline.store.features import open_store, read_attrs
from pipeline.store.features_writer import StoreWriter, chunk_len, write_store

D = 32


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")  # durability against OS crashes is not what these tests check


def _splits(n_train=3000, m_train=7000, n_test=5, m_test=11, dim=D, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n, m in (("train", n_train, m_train), ("test", n_test, m_test)):
        out[name] = {
            "image_emb": rng.standard_normal((n, dim)).astype(np.float32) * 3,
            "text_emb": rng.standard_normal((m, dim)).astype(np.float32),
            "text_image": rng.integers(0, n, m).astype(np.int32),
            "image_id": [f"{name}/photo_{i}_é.jpg" for i in range(n)],
        }
    return out


def _write(path, splits=None, **kw):
    splits = splits or _splits()
    kw.setdefault("chunk_rows", 1024)  # 1024 x 32 x 2 bytes = 64 KiB: whole pages, several chunks per array
    write_store(path, splits, teacher={"name": "t", "dim": D}, dataset={"name": "toy", "fingerprint": "f" * 64}, **kw)
    return splits


def _normalized(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_round_trip_fp16_default_normalized_and_equal_to_zarr_reads(tmp_path):
    splits = _write(tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr", expect_fingerprint="f" * 64, expect_dim=D)
    assert store.splits == ("train", "test") and store.dim == D
    assert store.teacher == {"name": "t", "dim": D} and store.dataset["name"] == "toy"
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # what a zarr-only user sees
    assert group.attrs["complete"] is True and group.attrs["format"] == "kdpipe-features"
    for name, src in splits.items():
        sp = store.split(name)
        for key in ("image_emb", "text_emb"):
            arr = getattr(sp, key)
            # several chunk files (train: chunk_rows 1024) -> ChunkedRows over their maps; one -> one memmap
            several = group[f"{name}/{key}"].nchunks > 1
            assert isinstance(arr, ChunkedRows if several else np.memmap) and arr.dtype == np.float16
            assert several or not arr.flags.writeable
            np.testing.assert_array_equal(arr, group[f"{name}/{key}"][...])
            np.testing.assert_allclose(arr.astype(np.float32), _normalized(src[key]), atol=1e-3)
            norms = np.linalg.norm(arr.astype(np.float32), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=2e-3)
        assert sp.text_image.dtype == np.int32
        np.testing.assert_array_equal(sp.text_image, src["text_image"])
        np.testing.assert_array_equal(group[f"{name}/text_image"][...], src["text_image"])
        assert sp.image_id.tolist() == src["image_id"]
        assert [str(v) for v in group[f"{name}/image_id"][...].tolist()] == src["image_id"]


def test_chunks_are_raw_uncompressed_files_and_the_store_is_rows_x_dim_x_2_bytes(tmp_path):
    _write(tmp_path / "s.zarr")
    meta = json.loads((tmp_path / "s.zarr/train/image_emb/zarr.json").read_text())
    assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1024, D]
    files = sorted((tmp_path / "s.zarr/train/image_emb/c").rglob("*"))
    chunk_files = [f for f in files if f.is_file()]
    assert len(chunk_files) == 3  # 3000 rows in chunks of 1024: 3 files, the last one padded
    assert all(f.stat().st_size == 1024 * D * 2 for f in chunk_files)
    # a small array is one exact-size chunk (no padding to chunk_rows)
    assert (tmp_path / "s.zarr/test/image_emb/c/0/0").stat().st_size == 5 * D * 2
    meta_ids = json.loads((tmp_path / "s.zarr/train/image_id/zarr.json").read_text())
    assert meta_ids["data_type"] == "string" and meta_ids["codecs"] == [{"name": "vlen-utf8", "configuration": {}}]


def test_chunk_files_hold_exactly_the_padded_normalized_rows(tmp_path):
    """The format oracle: each chunk file is the fp16 cast of the float32-normalized rows, zero-padded to
    chunk_rows rows, as raw little-endian bytes (what every kdpipe version wrote and np.memmap maps)."""
    splits = _write(tmp_path / "s.zarr")
    src = splits["train"]["text_emb"]
    rows = src / np.sqrt((src * src).sum(axis=1, dtype=np.float32))[:, None]
    for i in range(7):  # 7000 rows in chunks of 1024: the last one holds 856 rows + 168 zero rows
        block = np.zeros((1024, D), dtype="<f2")
        part = rows[i * 1024 : (i + 1) * 1024]
        block[: len(part)] = part
        found = np.frombuffer((tmp_path / f"s.zarr/train/text_emb/c/{i}/0").read_bytes(), dtype="<f2")
        # a float32 division order may differ from the naive one by 1 ulp before the fp16 rounding
        assert np.abs(found.astype(np.float32) - block.reshape(-1).astype(np.float32)).max() <= 2**-11
        if i == 6:
            assert not found.reshape(1024, D)[856:].any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_reader_maps_the_chunk_files_without_copying(tmp_path):
    _write(tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    arr = store.split("train").image_emb
    maps = Path("/proc/self/maps").read_text()
    for i in range(3):
        assert str(tmp_path / f"s.zarr/train/image_emb/c/{i}/0") in maps
    assert arr.shape == (3000, D) and len(arr) == 3000 and arr.nbytes == 3000 * D * 2
    inside = arr[1024:2000]  # rows of one chunk: a view of its map
    assert isinstance(inside, np.memmap) and not inside.flags.owndata and not inside.flags.writeable
    with pytest.raises(ValueError):
        inside[0, 0] = 1


def test_chunked_rows_index_like_the_array_they_stand_for(tmp_path):
    """Oracle: every indexing form of ChunkedRows equals the same indexing of the zarr-read numpy array."""
    _write(tmp_path / "s.zarr")
    arr = open_store(tmp_path / "s.zarr").split("train").text_emb  # 7000 rows, 7 chunks of 1024
    full = zarr.open_array(str(tmp_path / "s.zarr/train/text_emb"))[...]
    rng = np.random.default_rng(1)
    idx = rng.integers(-7000, 7000, 256)
    mask = rng.random(7000) < 0.1
    for key in (
        Ellipsis,
        5,
        -1,
        1023,
        1024,
        np.int64(6999),
        slice(None),
        slice(1000, 3100),
        slice(None, None, -3),
        slice(5000, 10),
        idx,
        idx.tolist(),
        mask,
        (idx, 3),
        (5, 3),
        (np.int64(-1), slice(0, 4)),
        (mask, -1),
        (slice(10, 2050), slice(0, 4)),
    ):
        np.testing.assert_array_equal(arr[key], full[key], err_msg=str(key))
    out = np.empty((256, D), np.float16)
    np.take(arr, idx, axis=0, out=out)
    np.testing.assert_array_equal(out, full[idx])
    np.testing.assert_array_equal(np.asarray(arr), full)
    assert np.asarray(arr, dtype=np.float32).dtype == np.float32 and arr.astype(np.float32).shape == full.shape
    with pytest.raises(IndexError):
        arr[np.array([7000])]
    with pytest.raises(IndexError):
        arr[np.zeros(10, bool)]


def test_store_bytes_match_a_store_of_the_previous_writer(tmp_path):
    """Rewriting the writer on zarr's API kept the format: same files, same bytes, same attrs as the
    raw-file writer of kdpipe 0.x (fixture made with it from the same seeded inputs)."""
    fixture = Path(__file__).parent / "data" / "feature_store_v1"
    splits = _splits(n_train=40, m_train=90, n_test=5, m_test=11, dim=8, seed=7)
    kw = {"teacher": {"name": "t", "dims": (8, 8)}, "dataset": {"name": "toy", "fingerprint": "f" * 64}}
    write_store(tmp_path / "s.zarr", splits, chunk_rows=16, **kw)
    files = sorted(p.relative_to(fixture) for p in fixture.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "s.zarr") for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    for f in files:
        if f.name != "zarr.json":
            assert (tmp_path / "s.zarr" / f).read_bytes() == (fixture / f).read_bytes(), f
    assert read_attrs(tmp_path / "s.zarr") == read_attrs(fixture)
    np.testing.assert_array_equal(
        open_store(fixture).split("train").text_emb[...], open_store(tmp_path / "s.zarr").split("train").text_emb[...]
    )


def test_unaligned_chunks_and_float32_still_read_correctly(tmp_path):
    splits = _write(tmp_path / "s.zarr", _splits(n_train=300, m_train=700), chunk_rows=7, dtype="float32")
    assert (tmp_path / "s.zarr/train/image_emb/c/0/0").stat().st_size == 7 * D * 4  # not whole pages
    store = open_store(tmp_path / "s.zarr")
    sp = store.split("train")
    assert sp.image_emb.dtype == np.float32
    np.testing.assert_allclose(sp.image_emb, _normalized(splits["train"]["image_emb"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sp.text_emb, zarr.open_array(str(tmp_path / "s.zarr/train/text_emb"))[...])


def test_chunk_len_balances_chunks_and_aligns_them_to_64k():
    # Flickr30K captions, D=1024 fp16: 10 chunks of 15,904 rows (a multiple of 32 rows = 64 KiB), 0.08% padding
    assert chunk_len(158_915, 16384, 2048) == 15_904
    assert chunk_len(100, 16384, 2048) == 100  # small: one exact chunk
    assert chunk_len(16384 * 3, 16384, 2816) == 16384  # D=1408: 256-row alignment, exact fit
    assert chunk_len(300, 128, 64) == 100  # 64 KiB would need 1024 rows > 128: balanced, unaligned
    for n, cr, rb in ((158_915, 16384, 2048), (31_783, 16384, 2816), (616_767, 16384, 768), (10, 3, 4)):
        c = chunk_len(n, cr, rb)
        assert c <= cr and -(-n // c) * c - n < c


def test_empty_split_arrays(tmp_path):
    splits = _splits()
    splits["test"] = {
        "image_emb": np.zeros((0, D), np.float32),
        "text_emb": np.zeros((0, D), np.float32),
        "text_image": np.zeros(0, np.int32),
        "image_id": [],
    }
    _write(tmp_path / "s.zarr", splits)
    sp = open_store(tmp_path / "s.zarr").split("test")
    assert sp.image_emb.shape == (0, D) and sp.text_emb.shape == (0, D) and sp.image_id.tolist() == []


def _edit_array(array_dir, **kw):
    """Set (None: delete) top-level fields of an array's zarr.json."""
    doc = json.loads((array_dir / "zarr.json").read_text())
    for key, value in kw.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    (array_dir / "zarr.json").write_text(json.dumps(doc))


def _set_attr(path, **kw):
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"].update(kw)
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: _set_attr(p, complete=False), "incomplete"),
        (lambda p: _set_attr(p, version=2), "version 2"),
        (lambda p: _set_attr(p, format="something-else"), "not a kdpipe feature store"),
        (lambda p: (p / "zarr.json").unlink(), "not a feature store"),
        (lambda p: (p / "zarr.json").write_text("{broken"), "not a feature store"),
        (lambda p: (p / "zarr.json").write_text("[" * 100_000 + "]" * 100_000), "not a feature store"),
        # the attributes against the arrays: a dtype the arrays do not have, rows said not to be normalized
        (
            lambda p: _set_attr(p, dtype="float32"),
            "train/image_emb has dtype float16, but the store's attribute dtype says float32",
        ),
        (lambda p: _set_attr(p, dtype="int8"), r"attribute dtype='int8'; expected one of float16, float32"),
        (lambda p: _set_attr(p, normalized=False), "attribute normalized=False; a format v1 store holds L2-normalized"),
        (lambda p: _set_attr(p, normalized=None), "attribute normalized=None"),
        # an array's own metadata: not JSON, a field of the wrong type, a field missing
        (
            lambda p: (p / "test/text_emb/zarr.json").write_text("{broken"),
            r"test/text_emb: cannot be read as a Zarr array",
        ),
        (
            lambda p: _edit_array(p / "test/text_emb", shape="x"),
            r"test/text_emb: cannot be read as a Zarr array .*TypeError",
        ),
        (
            lambda p: _edit_array(p / "test/text_emb", data_type=None),
            r"test/text_emb: zarr.json is not valid Zarr array",
        ),
        (lambda p: shutil.rmtree(p / "test" / "text_emb"), "split 'test' has no array 'text_emb'"),
        (lambda p: (p / "train/image_emb/c/1/0").write_bytes(b"short"), "truncated"),
        (lambda p: (p / "train/image_emb/c/2/0").unlink(), "missing"),
    ],
)
def test_reader_refuses_broken_stores(tmp_path, edit, message):
    _write(tmp_path / "s.zarr")
    edit(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=message):
        open_store(tmp_path / "s.zarr")


def test_reader_checks_dim_fingerprint_and_caption_rows(tmp_path):
    _write(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=f"dimension {D}, expected 64"):
        open_store(tmp_path / "s.zarr", expect_dim=64)
    with pytest.raises(InputError, match="computed from dataset index ffffffffffff, not from the current index 000"):
        open_store(tmp_path / "s.zarr", expect_fingerprint="0" * 64)
    with pytest.raises(InputError, match="no feature store here"):
        open_store(tmp_path / "missing.zarr")
    store = open_store(tmp_path / "s.zarr")
    with pytest.raises(InputError, match="no split 'val'.*train, test"):
        store.split("val")
    ti = zarr.open_array(str(tmp_path / "s.zarr/test/text_image"), mode="r+")
    ti[3] = 5  # the test split has 5 images: rows 0..4
    with pytest.raises(InputError, match=r"test/text_image\[3\] = 5 points outside the split's 5 images"):
        open_store(tmp_path / "s.zarr")


def test_reader_refuses_compressed_arrays(tmp_path):
    _write(tmp_path / "s.zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    data = group["test/image_emb"][...]
    del group["test/image_emb"]
    group.create_array("test/image_emb", data=data, chunks=(5, D))  # zarr's default: zstd compression
    with pytest.raises(InputError, match="raw\\s+uncompressed|uncompressed chunks"):
        open_store(tmp_path / "s.zarr")


def test_writer_refuses_to_overwrite_a_foreign_directory_and_bad_inputs(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="not a feature store"):
        _write(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    bad = _splits()
    bad["test"]["text_image"][0] = 99
    with pytest.raises(ValueError, match="outside"):
        _write(tmp_path / "s.zarr", bad)
    nan = _splits()
    nan["train"]["text_emb"][5, 0] = np.nan
    with pytest.raises(
        InputError, match=r"s2\.zarr: train/text_emb chunk c/0/0 row 5: the teacher produced non-finite"
    ):
        _write(tmp_path / "s2.zarr", nan)
    assert read_attrs(tmp_path / "s2.zarr")["complete"] is False  # a failed write never looks complete


def test_store_writer_chunks_in_any_order_then_complete(tmp_path):
    rng = np.random.default_rng(3)
    w = StoreWriter.create(
        tmp_path / "s.zarr",
        layout={"val": (10, 25)},
        dim=D,
        chunk_rows=4,
        attrs={"teacher": {"name": "t"}, "dataset": {"fingerprint": "x"}},
    )
    img, txt = rng.standard_normal((10, D)), rng.standard_normal((25, D))
    for key, data in (("text_emb", txt), ("image_emb", img)):
        for i in reversed(range(w.n_chunks("val", key))):
            a, b = w.chunk_range("val", key, i)
            w.write_chunk("val", key, i, data[a:b])
    w.write_text_image("val", np.arange(25) % 10)
    w.write_image_id("val", [str(i) for i in range(10)])
    with pytest.raises(InputError, match="incomplete"):
        open_store(tmp_path / "s.zarr")
    w.set_attrs(complete=True)
    sp = open_store(tmp_path / "s.zarr").split("val")
    np.testing.assert_allclose(sp.text_emb.astype(np.float32), _normalized(txt), atol=1e-3)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


# -- unpaired items: images no caption names, texts without an image -----------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_unpaired_texts_are_an_additive_optional_array(tmp_path):
    """A store with unpaired texts is the paired-only store plus one directory: remove it and every other file
    is byte-identical, so a version-1 reader (which opens only the four arrays) reads exactly the pairs."""
    rng = np.random.default_rng(1)
    paired = _splits(n_train=40, m_train=30, n_test=5, m_test=11)
    paired["train"]["text_image"] = (np.arange(30) % 35).astype(np.int32)  # images 30..39 have no caption
    extra = rng.standard_normal((7, D)).astype(np.float32) * 2
    with_texts = {**paired, "train": {**paired["train"], "unpaired_text_emb": extra}}
    _write(tmp_path / "p.zarr", paired)
    _write(tmp_path / "u.zarr", with_texts)
    store = open_store(tmp_path / "u.zarr")
    train = store.split("train")
    assert train.n_unpaired_texts == 7 and store.split("test").unpaired_text_emb is None
    np.testing.assert_allclose(train.unpaired_text_emb, _normalized(extra), atol=1e-3)
    assert train.unpaired_text_emb.dtype == np.float16 and not train.unpaired_text_emb.flags.writeable
    assert train.unpaired_image.tolist() == list(range(30, 40))
    assert open_store(tmp_path / "p.zarr").split("train").n_unpaired_texts == 0
    files = _files(tmp_path / "u.zarr")
    assert any(k.startswith("train/unpaired_text_emb/") for k in files)
    assert {k: v for k, v in files.items() if not k.startswith("train/unpaired_text_emb/")} == _files(
        tmp_path / "p.zarr"
    )
    # the writer reopens a store with the optional array (extract resumes through StoreWriter)
    w = StoreWriter(tmp_path / "u.zarr")
    assert w.rows("train", "unpaired_text_emb") == 7 and w.rows("test", "unpaired_text_emb") == 0


def test_a_v1_store_built_with_plain_zarr_opens_without_unpaired_texts(tmp_path):
    """The documented v1 layout, written by "another tool" with nothing but zarr (no kdpipe writer)."""
    path = tmp_path / "v1.zarr"
    attrs = {"format": "kdpipe-features", "version": 1, "complete": True, "dim": D, "normalized": True,
             "dtype": "float32", "splits": ["test"], "teacher": {}, "dataset": {}}  # fmt: skip
    root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
    g = root.create_group("test")
    img = _normalized(np.random.default_rng(2).standard_normal((4, D))).astype(np.float32)
    for key, rows in (("image_emb", img), ("text_emb", img[[0, 0, 1, 2, 3]])):
        arr = g.create_array(key, shape=rows.shape, chunks=rows.shape, dtype="float32", compressors=None)
        arr[...] = rows
    g.create_array("text_image", shape=(5,), chunks=(5,), dtype="int32", compressors=None)[...] = [0, 0, 1, 2, 3]
    ids = g.create_array("image_id", shape=(4,), chunks=(4,), dtype=str, compressors=None)
    ids[...] = np.array(["a", "b", "c", "d"], dtype=np.dtypes.StringDType())
    split = open_store(path).split("test")
    assert split.unpaired_text_emb is None and split.n_unpaired_texts == 0 and split.unpaired_image.size == 0
    np.testing.assert_array_equal(split.text_emb, img[[0, 0, 1, 2, 3]])
