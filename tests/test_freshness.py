"""Content-aware freshness (issue 13): an image file replaced after prepare is decoded again, alone, and the
feature-store chunks that embedded it are computed again, alone; the results equal a fresh run's bit for bit;
unchanged data costs stat calls only; `--verify` catches a file whose size and mtime were put back."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from extract_helpers import TinyTeacher, make_dataset, store_files
from PIL import Image

import pipeline.data.file_hashes as fh
import pipeline.data.prepare as prep
from pipeline.data.file_hashes import content_hashes, sha256_file
from pipeline.data.index import DatasetIndex
from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.locks import lock_path
from pipeline.paths import ArtifactPaths
from pipeline.store.features import open_store
from pipeline.store.image_cache import open_image_cache

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 7


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


def write_image(path: Path, seed: int) -> None:
    """A 12x10 BMP of random pixels: uncompressed, so every such file has the same size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(N_IMAGES):
        write_image(root / "images" / f"im{i}.bmp", seed=i)
        split = "test" if i >= 5 else "train"
        images.append({"filename": f"im{i}.bmp", "split": split, "sentences": [{"raw": f"picture {i}"}]})
    (root / "ann.json").write_text(json.dumps({"images": images}))
    return root


def config(data: Path) -> PrepareConfig:
    ds = DatasetConfig(name="fresh", annotations=data / "ann.json", image_root=data / "images")
    return PrepareConfig(dataset=ds, image=ResizeConfig(mode="squash", crop=8), workers=1, chunk_images=2)


def tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def count_decodes(monkeypatch) -> list[str]:
    decoded: list[str] = []
    real = prep.decode_block

    def counting(paths, *args):
        decoded.extend(Path(p.path).name for p in paths)
        return real(paths, *args)

    monkeypatch.setattr(prep, "decode_block", counting)
    return decoded


def count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = fh.sha256_file
    monkeypatch.setattr(fh, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


def put_back_stats(path: Path, st: os.stat_result) -> None:
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- prepare ---------------------------------------------------------------------------------------------
def test_unchanged_data_is_nothing_to_do_with_stat_calls_only(data, tmp_path, monkeypatch):
    paths = ArtifactPaths(tmp_path / "work")
    old = {f: (data / "images" / f).stat() for f in os.listdir(data / "images")}
    for f, st in old.items():  # mtimes safely in the past: the racy-mtime guard would re-hash fresh files
        os.utime(data / "images" / f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))
    first = run_prepare(config(data), paths)
    assert first["status"] == "written"
    index = DatasetIndex.load(paths.index_dir)
    assert index.image_sha256.tolist() == [sha256_file(data / "images" / p) for p in index.image_path]
    stats = json.loads(paths.file_stats.read_text())
    assert stats["version"] == 1 and len(stats["files"]) == N_IMAGES

    hashed, decoded = count_hashes(monkeypatch), count_decodes(monkeypatch)
    again = run_prepare(config(data), paths)
    assert again["status"] == "unchanged" and again["changed_images"] == 0
    assert hashed == [] and decoded == []


def test_replaced_image_is_decoded_alone_and_equals_a_fresh_prepare(data, tmp_path, monkeypatch):
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    index_before = tree(paths.index_dir)
    write_image(data / "images" / "im3.bmp", seed=99)  # same size, other pixels, new mtime

    decoded = count_decodes(monkeypatch)
    summary = run_prepare(config(data), paths)
    assert summary["status"] == "updated" and summary["changed_images"] == 1 and decoded == ["im3.bmp"]
    monkeypatch.undo()
    # the index says which bytes its rows are (so DVC reruns extract, which depends on it); fingerprint kept
    assert tree(paths.index_dir)["images.parquet"] != index_before["images.parquet"]
    assert summary["fingerprint"] == DatasetIndex.load(paths.index_dir).fingerprint

    fresh = ArtifactPaths(tmp_path / "fresh")
    run_prepare(config(data), fresh)
    assert tree(paths.images) == tree(fresh.images)  # every file of the cache, bit for bit
    assert tree(paths.index_dir) == tree(fresh.index_dir)
    assert run_prepare(config(data), paths)["status"] == "unchanged"


def test_verify_catches_a_file_whose_size_and_mtime_were_put_back(data, tmp_path, monkeypatch):
    paths = ArtifactPaths(tmp_path / "work")
    target = data / "images" / "im1.bmp"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))  # old enough to be remembered
    st = target.stat()
    run_prepare(config(data), paths)
    write_image(target, seed=123)
    put_back_stats(target, st)

    assert run_prepare(config(data), paths)["status"] == "unchanged"  # the fast path trusts size + mtime
    hashed, decoded = count_hashes(monkeypatch), count_decodes(monkeypatch)
    verified = run_prepare(config(data), paths, verify=True)
    assert verified["status"] == "updated" and verified["changed_images"] == 1
    assert sorted(hashed) == sorted(os.listdir(data / "images")) and decoded == ["im1.bmp"]
    cache = open_image_cache(paths.images)
    expected = decode_image(target, config(data).image)
    np.testing.assert_array_equal(cache.split("train")[1], expected)


def test_a_crash_during_an_update_keeps_the_old_cache_and_the_rerun_rebuilds(data, tmp_path, monkeypatch):
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    before = tree(paths.images)
    write_image(data / "images" / "im6.bmp", seed=7)
    monkeypatch.setattr(prep.CacheUpdate, "publish", lambda self, attrs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run_prepare(config(data), paths)
    monkeypatch.undo()
    assert tree(paths.images) == before  # untouched, and no temp copy left beside it
    temps = [
        p.name for p in paths.workdir.iterdir() if p.name.startswith(".images.zarr") and p != lock_path(paths.images)
    ]
    assert temps == []  # (the lock file stays: readers lock it too, pipeline/locks.py)
    # the index was saved with the new hashes, the cache was not: they disagree, so the rerun builds whole
    assert run_prepare(config(data), paths)["status"] == "written"
    fresh = ArtifactPaths(tmp_path / "fresh")
    run_prepare(config(data), fresh)
    assert tree(paths.images) == tree(fresh.images)


def test_a_replaced_image_that_no_longer_decodes(data, tmp_path):
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    (data / "images" / "im2.bmp").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"im2\.bmp: not an image file"):
        run_prepare(config(data), paths)
    skip = replace(config(data), on_bad_image="skip")
    summary = run_prepare(skip, paths)  # rows must be dropped: built whole
    assert summary["status"] == "written" and summary["bad_images"] == 1
    assert run_prepare(skip, paths)["status"] == "unchanged"
    write_image(data / "images" / "im2.bmp", seed=2)  # fixed: seen through the hash in bad_images.json
    assert run_prepare(skip, paths)["status"] == "written"
    assert DatasetIndex.load(paths.index_dir).n_images == N_IMAGES


def test_outputs_of_an_older_kdpipe_load_and_are_rebuilt_once(data, tmp_path, caplog):
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    with_hashes = DatasetIndex.load(paths.index_dir)
    old = replace(with_hashes, image_sha256=None)
    old.save(paths.index_dir)  # as an older kdpipe wrote it: no sha256 column, no content digest
    assert "content" not in json.loads((paths.index_dir / "index.json").read_text())
    loaded = DatasetIndex.load(paths.index_dir)
    assert loaded.image_sha256 is None and loaded.fingerprint == with_hashes.fingerprint
    import zarr

    group = zarr.open_group(paths.images, mode="r+")
    group.attrs.update({"content": None})
    with caplog.at_level("INFO"):
        assert run_prepare(config(data), paths)["status"] == "written"
    assert "records no image content hashes" in caplog.text
    assert DatasetIndex.load(paths.index_dir).image_sha256 is not None


def test_hashes_do_not_change_the_fingerprint_and_hand_edits_are_refused(data, tmp_path):
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    index = DatasetIndex.load(paths.index_dir)
    assert replace(index, image_sha256=None).fingerprint == index.fingerprint
    edited = list(index.image_sha256)
    edited[0] = "0" * 64
    bad = replace(index, image_sha256=np.array(edited, dtype=object))
    bad.save(tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "index.json").read_text())
    meta["content"] = index.content_digest()
    (tmp_path / "edited" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="image hashes do not match"):
        DatasetIndex.load(tmp_path / "edited")


def test_content_hashes_cache_file(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 10)
    for f in (a, b):
        os.utime(f, ns=(0, 10**18))  # 2001: not racy
    stats = tmp_path / "cache" / "file_stats.json"
    hashes, n = content_hashes([str(a), str(b), str(tmp_path / "missing")], stats)
    import hashlib

    assert hashes == [hashlib.sha256(b"x" * 10).hexdigest(), hashlib.sha256(b"y" * 10).hexdigest(), None]
    assert n == 2
    assert content_hashes([str(a), str(b)], stats)[1] == 0
    stats.write_text("{not json")  # a damaged cache is rebuilt, not an error
    assert content_hashes([str(a), str(b)], stats) == (hashes[:2], 2)


# -- extract ---------------------------------------------------------------------------------------------
CFG = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)


def hashed(index: DatasetIndex) -> DatasetIndex:
    return index.with_hashes([sha256_file(index.image_abspath(r)) for r in range(index.n_images)])


def chunk_stats(store: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every chunk file of the embedding arrays."""
    return {
        str(f.relative_to(store)): (f.stat().st_ino, f.stat().st_mtime_ns)
        for f in store.rglob("*")
        if f.is_file() and "/c/" in f.as_posix() and "_emb/" in f.as_posix()
    }


def test_extract_recomputes_only_the_chunks_of_changed_images(tmp_path):
    index = hashed(make_dataset(tmp_path / "data", n_train=20, n_test=5))
    out = tmp_path / "features.zarr"
    first = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert first.units_computed == first.units_total
    assert len(json.loads((out / "zarr.json").read_text())["attributes"]["image_chunks"]["train"]) == 3
    before = chunk_stats(out)

    # replace train image 10 (image chunk 1 of train: rows 8..15) by other pixels of the same size
    path = index.image_abspath(10)
    Image.fromarray(np.full((14, 20, 3), 200, np.uint8)).save(path, format=Image.open(path).format)
    changed = hashed(index)
    assert changed.fingerprint == index.fingerprint
    with pytest.raises(InputError, match=r"made from image files that changed since .*rerun `kdpipe extract`"):
        changed.check_made_from(open_store(out).attrs["image_content"], str(out), "extract", ["train", "test"])
    # a store of the test split alone is not stale: its images did not change
    changed.check_made_from(index.content_digest(splits=["test"]), str(out), "extract", ["test"])
    again = run_extract(changed, CFG, out, teacher=TinyTeacher())
    assert again.units_computed == 1 and again.units_reused == again.units_total - 1

    fresh = tmp_path / "fresh.zarr"
    run_extract(changed, CFG, fresh, teacher=TinyTeacher())
    assert store_files(out) == store_files(fresh)  # bit for bit, attrs included
    assert open_store(out).attrs["image_content"] == changed.content_digest(splits=["train", "test"])
    after = chunk_stats(out)
    rewritten = sorted(k for k in before if before[k] != after.get(k))
    assert rewritten == ["train/image_emb/c/1/0"]


def test_a_failed_update_of_changed_chunks_keeps_the_complete_store(tmp_path):
    """The stale chunks are computed in a hard-linked copy beside the store: a failure leaves the store as it was,
    and the rerun computes only them."""
    index = hashed(make_dataset(tmp_path / "data", n_train=20, n_test=5))
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    before = store_files(out)
    path = index.image_abspath(10)
    Image.fromarray(np.full((14, 20, 3), 200, np.uint8)).save(path, format=Image.open(path).format)
    changed = hashed(index)
    with pytest.raises(RuntimeError, match="injected"):
        run_extract(changed, CFG, out, teacher=TinyTeacher(fail_after=0))
    assert store_files(out) == before and open_store(out).attrs["complete"] is True
    again = run_extract(changed, CFG, out, teacher=TinyTeacher())
    assert again.units_computed == 1
    fresh = tmp_path / "fresh.zarr"
    run_extract(changed, CFG, fresh, teacher=TinyTeacher())
    assert store_files(out) == store_files(fresh)
    assert not (tmp_path / ".features.zarr.next").exists()


def test_extract_rewrites_whole_when_nothing_or_more_than_images_changed(tmp_path):
    index = hashed(make_dataset(tmp_path / "data", n_train=12, n_test=4))
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    same = run_extract(index, CFG, out, teacher=TinyTeacher())  # a stage rewrites its output (as before)
    assert same.units_computed == same.units_total
    # a caption changed: a new fingerprint, the whole store again (even though an image changed too)
    texts = index.caption_text.copy()
    texts[0] = "an edited caption"
    Image.fromarray(np.zeros((14, 20, 3), np.uint8)).save(index.image_abspath(0))
    edited = hashed(replace(index, caption_text=texts))
    assert edited.fingerprint != index.fingerprint
    redo = run_extract(edited, CFG, out, teacher=TinyTeacher())
    assert redo.units_computed == redo.units_total


def test_a_resumed_extraction_redoes_chunks_whose_images_changed_meanwhile(tmp_path):
    index = hashed(make_dataset(tmp_path / "data", n_train=20, n_test=5))
    out = tmp_path / "features.zarr"
    with pytest.raises(RuntimeError, match="injected"):
        run_extract(index, CFG, out, teacher=TinyTeacher(fail_after=4))  # image chunk 0 of train committed
    path = index.image_abspath(1)
    Image.fromarray(np.full((14, 20, 3), 9, np.uint8)).save(path, format=Image.open(path).format)
    changed = hashed(index)
    run_extract(changed, CFG, out, teacher=TinyTeacher())
    fresh = tmp_path / "fresh.zarr"
    run_extract(changed, CFG, fresh, teacher=TinyTeacher())
    assert store_files(out) == store_files(fresh)


def test_distill_refuses_features_of_replaced_images(tmp_path):
    """By hand, `kdpipe prepare` after a replaced image without `kdpipe extract`: the fingerprint still matches,
    the recorded image content does not."""
    from test_train import make_workdir, tiny_cfg

    from pipeline.distill.run import run_distill
    from pipeline.store.features_writer import StoreWriter

    index = make_workdir(tmp_path)
    index = index.with_hashes([f"{r:064x}" for r in range(index.n_images)])
    StoreWriter(tmp_path / "features.zarr").set_attrs(image_content="ab" * 32)  # made from other files
    store = open_store(tmp_path / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(tmp_path / "images.zarr", expect_fingerprint=index.fingerprint)
    with pytest.raises(InputError, match=r"features\.zarr: made from image files that changed since"):
        run_distill(tiny_cfg(tmp_path), index=index, store=store, cache=cache, out_dir=tmp_path / "s")


# -- DVC -------------------------------------------------------------------------------------------------
def test_dvc_reruns_extract_when_an_image_file_changes():
    """prepare depends on the image files and writes the index, whose images.parquet holds their hashes (see
    test_replaced_image_is_decoded_alone_and_equals_a_fresh_prepare); extract depends on the index."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "${prepare.dataset.image_root}" in stages["prepare"]["deps"]
    assert "${workdir}/index" in stages["prepare"]["outs"]
    assert "${workdir}/index" in stages["extract"]["deps"]
    # the stat cache is not an output (DVC would hash per-machine mtimes) and is gitignored
    assert not any(".kdpipe" in str(o) for s in stages.values() for o in s.get("outs", []))
    assert "artifacts/*/.kdpipe/" in (ROOT / ".gitignore").read_text().split("\n")
