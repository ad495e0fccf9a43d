"""The image cache format: memmap reads equal zarr reads, compaction, refusal of incomplete/foreign stores."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import InputError
from pipeline.store.image_cache import CacheBuilder, open_image_cache, write_image_cache, write_rows


def random_images(n, h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_memmap_equals_input_and_plain_zarr_reads(tmp_path):
    train, test = random_images(10), random_images(3, seed=1)
    path = tmp_path / "images.zarr"
    write_image_cache(
        path, {"train": train, "test": test}, fingerprint="f" * 64, meta={"resize": {"mode": "x"}}, chunk_images=4
    )
    cache = open_image_cache(path, expect_fingerprint="f" * 64)
    assert cache.splits == ("train", "test") and cache.image_size == (6, 7)
    assert cache.attrs["format"] == "kdpipe-images" and cache.attrs["version"] == 1 and cache.attrs["complete"]
    assert cache.attrs["resize"] == {"mode": "x"}
    mm = cache.split("train")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable and mm.shape == (10, 6, 7, 3)
    np.testing.assert_array_equal(mm, train)
    np.testing.assert_array_equal(cache.split("test"), test)
    # any zarr v3 reader sees the same images, slices included
    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(group["train/images"][3:9], train[3:9])
    np.testing.assert_array_equal(group["test/images"][:], test)
    with pytest.raises(InputError, match="no split 'val'"):
        cache.split("val")


def test_compact_drops_rows_and_keeps_order(tmp_path):
    images = random_images(11)
    builder = CacheBuilder(tmp_path / "images.zarr", (6, 7), chunk_images=4)
    f = builder.allocate("train", 11)
    for s in range(0, 11, 4):
        write_rows(f, s, images[s : s + 4])
    assert builder.compact("train", [1, 5, 6, 10]) == 7
    builder.publish({"fingerprint": "a"})
    keep = [0, 2, 3, 4, 7, 8, 9]
    np.testing.assert_array_equal(open_image_cache(tmp_path / "images.zarr").split("train"), images[keep])
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "images.zarr/train/images")[:], images[keep])


def test_refuses_missing_incomplete_foreign_and_stale(tmp_path):
    with pytest.raises(InputError, match="no image cache here"):
        open_image_cache(tmp_path / "nothing.zarr")
    path = tmp_path / "images.zarr"
    write_image_cache(path, {"train": random_images(2)}, fingerprint="a" * 64)
    with pytest.raises(InputError, match="made from dataset index aaaa"):
        open_image_cache(path, expect_fingerprint="b" * 64)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="incomplete"):
        open_image_cache(path)
    meta["attributes"]["format"] = "something-else"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not a kdpipe-images v1 store"):
        open_image_cache(path)


def test_a_failed_write_leaves_nothing_at_the_path(tmp_path):
    path = tmp_path / "images.zarr"
    with pytest.raises(ValueError):
        write_image_cache(path, {"train": random_images(2).astype(np.float32)}, fingerprint="a")
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_cache_bytes_match_a_cache_of_the_previous_writer(tmp_path):
    """The shard file (rows back to back + hand-written index) and the metadata are the same, byte for byte,
    as those of the raw-path writer of kdpipe 0.x (fixture made with it from the same seeded images)."""
    fixture = Path(__file__).parent / "data" / "image_cache_v1"
    images = random_images(37, seed=7)
    write_image_cache(
        tmp_path / "i.zarr",
        {"train": images, "test": images[:5]},
        fingerprint="abc",
        meta={"resize": {"mode": "x"}},
        chunk_images=8,
    )
    files = sorted(p.relative_to(fixture) for p in fixture.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "i.zarr") for p in (tmp_path / "i.zarr").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "i.zarr" / f).read_bytes() == (fixture / f).read_bytes(), f
    np.testing.assert_array_equal(open_image_cache(fixture).split("train"), images)
    np.testing.assert_array_equal(zarr.open_array(fixture / "train" / "images", mode="r")[...], images)
