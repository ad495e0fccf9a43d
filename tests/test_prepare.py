"""prepare on real photos (scikit-image / scikit-learn): equality with a naive PIL reference, draft-mode
tolerance, bad images (error and skip), idempotent reruns, atomic writes, the dask path."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data import prepare as prep
from pipeline.data.index import DatasetIndex
from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.store.image_cache import open_image_cache


def photo_packages():
    """(skimage.data, sklearn.datasets): the real photos ship with them (demo extras); a test that needs them
    skips without."""
    return (
        pytest.importorskip("skimage.data", reason="the real test photos ship with scikit-image"),
        pytest.importorskip("sklearn.datasets", reason="the real test photos ship with scikit-learn"),
    )


FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def naive_reference(path, resize=256, crop=224, filt="bilinear") -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(crop) written out by hand: full decode, no draft."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            size = (resize, int(resize * h / w))
        else:
            size = (int(resize * w / h), resize)
        im = im.resize(size, FILTERS[filt])
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        return np.asarray(im.crop((left, top, left + crop, top + crop)))


def flickr_sized(photo: np.ndarray, size=(500, 375)) -> Image.Image:
    """A real photo as a Flickr-sized image (longest side 500), cropped to the aspect ratio, not stretched."""
    im = Image.fromarray(photo)
    w, h = size
    scale = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.LANCZOS)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos written as JPEG/PNG files, Flickr-sized, landscape and portrait, colour and grey."""
    skimage_data, sklearn_datasets = photo_packages()
    root = tmp_path_factory.mktemp("photos")
    china, flower = sklearn_datasets.load_sample_images().images
    flickr_sized(skimage_data.astronaut()).save(root / "astronaut.jpg", quality=90)
    flickr_sized(skimage_data.chelsea()).save(root / "chelsea.jpg", quality=85)
    flickr_sized(skimage_data.rocket(), (375, 500)).save(root / "rocket.jpg", quality=95)  # portrait
    flickr_sized(skimage_data.coffee(), (500, 333)).save(root / "coffee.jpg", quality=92)
    flickr_sized(china).save(root / "china.jpg", quality=90)
    flickr_sized(flower, (375, 500)).save(root / "flower.jpg", quality=80)
    Image.fromarray(skimage_data.camera()).resize((500, 375)).save(root / "camera_grey.jpg")  # mode L
    flickr_sized(skimage_data.coffee()[::-1]).save(root / "coffee_flipped.png")  # not a JPEG
    data = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image\n")
    # older than the hash cache's racy-mtime window (pipeline/data/file_hashes.py), so that what prepare
    # leaves in the workdir does not depend on how fast the machine reached the test
    old = time.time() - 3600
    for f in root.iterdir():
        os.utime(f, (old, old))
    return root


def leftovers(workdir: Path) -> list[str]:
    """What a run left in `workdir` besides kdpipe's own bookkeeping: lock files (`.<output>.kdpipe-lock`,
    pipeline/locks.py) and the per-machine hash cache `.kdpipe/` (pipeline/data/file_hashes.py)."""
    return sorted(p.name for p in workdir.iterdir() if not (p.name.endswith(".kdpipe-lock") or p.name == ".kdpipe"))


GOOD = [
    "astronaut.jpg",
    "chelsea.jpg",
    "rocket.jpg",
    "coffee.jpg",
    "china.jpg",
    "flower.jpg",
    "camera_grey.jpg",
    "coffee_flipped.png",
]
SPLITS = ["train", "train", "test", "train", "test", "train", "test", "train"]


def write_annotations(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Karpathy-style file: each (filename, split) with 2-3 captions."""
    images = [
        {
            "filename": f,
            "split": s,
            "imgid": i,
            "sentences": [{"raw": f"{f} caption {k}", "imgid": i} for k in range(2 + i % 2)],
        }
        for i, (f, s) in enumerate(rows)
    ]
    path.write_text(json.dumps({"images": images}))
    return path


def config(photos: Path, ann: Path, **kw) -> PrepareConfig:
    ds = DatasetConfig(name="photos", annotations=ann, image_root=photos)
    kw.setdefault("workers", 1)
    return PrepareConfig(dataset=ds, **kw)


def test_output_equals_naive_reference_pixel_for_pixel(photos, tmp_path):
    ann = write_annotations(tmp_path / "ann.json", list(zip(GOOD, SPLITS)))
    paths = ArtifactPaths(tmp_path / "work")
    summary = run_prepare(config(photos, ann, chunk_images=3), paths)
    assert summary["status"] == "written" and summary["bad_images"] == 0
    index = DatasetIndex.load(paths.index_dir)
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    assert cache.splits == ("train", "test") and cache.image_size == (224, 224)
    assert cache.attrs["resize"] == ResizeConfig().describe()
    for split in cache.splits:
        view = index.split(split)
        images = cache.split(split)
        assert images.shape == (view.n_images, 224, 224, 3)
        for row, path in enumerate(view.image_path):
            np.testing.assert_array_equal(images[row], naive_reference(path), err_msg=path)
    assert json.loads((paths.index_dir / "bad_images.json").read_text()) == []


@pytest.mark.parametrize(
    "rc",
    [
        ResizeConfig(filter="bicubic", resize=160, crop=128, draft=False),
        ResizeConfig(mode="squash", crop=96, draft=False),
    ],
)
def test_other_recipes_match_their_references(photos, rc):
    for name in ("rocket.jpg", "china.jpg", "camera_grey.jpg"):
        out = decode_image(photos / name, rc)
        if rc.mode == "squash":
            with Image.open(photos / name) as im:
                ref = np.asarray(im.convert("RGB").resize((rc.crop, rc.crop), FILTERS[rc.filter]))
        else:
            ref = naive_reference(photos / name, rc.resize, rc.crop, rc.filter)
        np.testing.assert_array_equal(out, ref)


def test_draft_mode_is_faithful_within_tolerance(tmp_path):
    """Large JPEGs take libjpeg's DCT-scaled decode: mean |diff| < 2 grey levels and PSNR > 35 dB vs a full
    decode (measured 0.3-1.4 and 40-53 dB); without draft, equal to the reference pixel for pixel."""
    skimage_data, sklearn_datasets = photo_packages()
    china, flower = sklearn_datasets.load_sample_images().images
    big = {
        "retina.jpg": skimage_data.retina(),  # 1411 x 1411: 1/4 scale
        "hubble.jpg": skimage_data.hubble_deep_field(),  # 1000 x 872: 1/2 scale
        "mosaic.jpg": np.concatenate(
            [
                np.concatenate([skimage_data.astronaut()[:384], china[:384, :512]], 1),
                np.concatenate([flower[:384, :512], skimage_data.rocket()[:384, :512]], 1),
            ]
        ),
        "odd.jpg": np.asarray(Image.fromarray(china).resize((1283, 857), Image.LANCZOS)),
    }  # non-multiple of 4
    for name, pixels in big.items():
        Image.fromarray(pixels).save(tmp_path / name, quality=90)
        ref = naive_reference(tmp_path / name)
        np.testing.assert_array_equal(decode_image(tmp_path / name, ResizeConfig(draft=False)), ref)
        fast = decode_image(tmp_path / name, ResizeConfig(draft=True)).astype(np.float64)
        assert not np.array_equal(fast, ref), f"{name}: draft mode did not engage"
        diff = np.abs(fast - ref)
        psnr = 10 * np.log10(255**2 / np.mean(diff**2))
        assert diff.mean() < 2.0 and psnr > 35, f"{name}: mean {diff.mean():.2f}, PSNR {psnr:.1f} dB"


def test_bad_images_error_mode_names_the_file_and_writes_nothing(photos, tmp_path):
    rows = [
        ("astronaut.jpg", "train"),
        ("truncated.jpg", "train"),
        ("chelsea.jpg", "test"),
        ("empty.jpg", "test"),
        ("missing.jpg", "train"),
        ("notes.jpg", "train"),
    ]
    ann = write_annotations(tmp_path / "ann.json", rows)
    paths = ArtifactPaths(tmp_path / "work")
    with pytest.raises(InputError) as err:
        run_prepare(config(photos, ann, chunk_images=2), paths)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{photos / 'truncated.jpg'}: truncated image")
    assert "3 other image(s) failed too (empty.jpg, missing.jpg, notes.jpg)" in message
    assert "on_bad_image: skip" in message
    assert not paths.images.exists() and not paths.index_dir.exists()
    assert leftovers(paths.workdir) == []  # no temp dir left behind


def test_bad_images_skip_mode_leaves_them_out_and_reports_them(photos, tmp_path):
    rows = [
        ("astronaut.jpg", "train"),
        ("truncated.jpg", "train"),
        ("chelsea.jpg", "test"),
        ("empty.jpg", "test"),
        ("rocket.jpg", "train"),
        ("missing.jpg", "train"),
        ("notes.jpg", "train"),
        ("coffee.jpg", "train"),
        ("china.jpg", "test"),
    ]
    ann = write_annotations(tmp_path / "ann.json", rows)
    paths = ArtifactPaths(tmp_path / "work")
    summary = run_prepare(config(photos, ann, chunk_images=2, on_bad_image="skip"), paths)
    assert summary["bad_images"] == 4 and summary["images"] == {"train": 3, "test": 2}
    report = json.loads((paths.index_dir / "bad_images.json").read_text())
    assert [(Path(r["file"]).name, r["split"]) for r in report] == [
        ("truncated.jpg", "train"),
        ("empty.jpg", "test"),
        ("missing.jpg", "train"),
        ("notes.jpg", "train"),
    ]
    reasons = [r["reason"] for r in report]
    assert reasons[0].startswith("truncated image") and reasons[1:] == [
        "empty file",
        "file not found",
        "not an image file PIL can read",
    ]
    assert report[0]["captions"] == ["truncated.jpg caption 0", "truncated.jpg caption 1", "truncated.jpg caption 2"]
    assert report[2]["captions"] == ["missing.jpg caption 0", "missing.jpg caption 1", "missing.jpg caption 2"]
    assert report[3]["captions"] == ["notes.jpg caption 0", "notes.jpg caption 1"]
    index = DatasetIndex.load(paths.index_dir)
    assert index.image_id.tolist() == ["astronaut.jpg", "chelsea.jpg", "rocket.jpg", "coffee.jpg", "china.jpg"]
    assert not any("truncated" in t or "empty" in t for t in index.caption_text)
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    assert cache.attrs["n_bad"] == 4
    for split in ("train", "test"):
        view = index.split(split)
        for row, path in enumerate(view.image_path):
            np.testing.assert_array_equal(cache.split(split)[row], naive_reference(path))


def test_skip_mode_that_drops_a_whole_split_says_so_in_one_line(photos, tmp_path, caplog):
    caplog.set_level("INFO", logger="pipeline")  # prepare speaks through logging (the CLI shows it)
    rows = [("astronaut.jpg", "train"), ("chelsea.jpg", "train"), ("empty.jpg", "val"), ("notes.jpg", "val")]
    ann = write_annotations(tmp_path / "ann.json", rows)
    paths = ArtifactPaths(tmp_path / "work")
    summary = run_prepare(config(photos, ann, chunk_images=2, on_bad_image="skip"), paths)
    assert summary["images"] == {"train": 2} and DatasetIndex.load(paths.index_dir).splits == ("train",)
    lines = [r.getMessage() for r in caplog.records if "'val'" in r.getMessage()]
    assert lines == [
        f"prepare: split 'val' is left out: all its 2 images failed to decode (prepare.on_bad_image: skip; "
        f"listed in {paths.index_dir / 'bad_images.json'})"
    ]


def test_rerun_is_a_noop_and_changes_are_not(photos, tmp_path, monkeypatch):
    ann = write_annotations(tmp_path / "ann.json", list(zip(GOOD[:4], SPLITS[:4])))
    paths = ArtifactPaths(tmp_path / "work")
    cfg = config(photos, ann)
    first = run_prepare(cfg, paths)
    shard = next(paths.images.rglob("c/0/0/0/0"))
    stamp = (shard.stat().st_mtime_ns, (paths.index_dir / "index.json").stat().st_mtime_ns)

    calls = []
    monkeypatch.setattr(prep, "decode_block", lambda *a: calls.append(a))
    again = run_prepare(cfg, paths)
    assert again["status"] == "unchanged" and again["fingerprint"] == first["fingerprint"] and calls == []
    assert (shard.stat().st_mtime_ns, (paths.index_dir / "index.json").stat().st_mtime_ns) == stamp

    # the dataset moved: still a no-op, but the index now points at the new place
    moved = tmp_path / "moved"
    moved.symlink_to(photos)
    cfg_moved = PrepareConfig(dataset=DatasetConfig(name="photos", annotations=ann, image_root=moved), workers=1)
    assert run_prepare(cfg_moved, paths)["status"] == "unchanged" and calls == []
    assert DatasetIndex.load(paths.index_dir).image_root == moved
    monkeypatch.undo()

    # a different recipe or a changed caption redoes the work
    assert run_prepare(config(photos, ann, image=ResizeConfig(crop=200)), paths)["status"] == "written"
    assert open_image_cache(paths.images).image_size == (200, 200)
    ann.write_text(ann.read_text().replace("chelsea.jpg caption 1", "a cat"))
    redo = run_prepare(config(photos, ann, image=ResizeConfig(crop=200)), paths)
    assert redo["status"] == "written" and redo["fingerprint"] != first["fingerprint"]
    assert run_prepare(config(photos, ann, image=ResizeConfig(crop=200)), paths, force=True)["status"] == "written"


def test_a_crash_never_leaves_a_complete_store(photos, tmp_path, monkeypatch):
    ann = write_annotations(tmp_path / "ann.json", list(zip(GOOD, SPLITS)))
    paths = ArtifactPaths(tmp_path / "work")
    real = prep.decode_block
    blocks = []

    def crash_on_third_block(*args):
        blocks.append(1)
        if len(blocks) == 3:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C (or the process died) mid-write
        return real(*args)

    monkeypatch.setattr(prep, "decode_block", crash_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(config(photos, ann, chunk_images=2), paths)
    assert not paths.images.exists() and not (paths.index_dir / "index.json").exists()
    assert leftovers(paths.workdir) == []
    monkeypatch.undo()

    # a finished store, then a crash while publishing a new one: the old store stays whole, and since its
    # fingerprint no longer matches the new index, neither a rerun nor a reader takes it as current
    old = run_prepare(config(photos, ann), paths)
    ann.write_text(ann.read_text().replace("china.jpg caption 0", "a temple"))
    monkeypatch.setattr(prep.CacheBuilder, "publish", lambda self, attrs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run_prepare(config(photos, ann), paths)
    assert open_image_cache(paths.images).attrs["fingerprint"] == old["fingerprint"]
    with pytest.raises(InputError, match="rerun `kdpipe prepare`"):
        open_image_cache(paths.images, expect_fingerprint=DatasetIndex.load(paths.index_dir).fingerprint)
    monkeypatch.undo()
    assert run_prepare(config(photos, ann), paths)["status"] == "written"

    # a temp dir left by a killed process is cleaned up by the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = paths.workdir / f".images.zarr.{dead.pid}-deadbeef.partial"
    stale.mkdir()
    run_prepare(config(photos, ann), paths, force=True)
    assert not stale.exists()


def test_truncated_images_guard(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    ann = write_annotations(tmp_path / "ann.json", [("astronaut.jpg", "train")])
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        run_prepare(config(photos, ann), ArtifactPaths(tmp_path / "work"))


def test_dask_local_cluster_matches_in_process(photos, tmp_path):
    rows = list(zip(GOOD, SPLITS)) + [("truncated.jpg", "train")]
    ann = write_annotations(tmp_path / "ann.json", rows)
    a, b = ArtifactPaths(tmp_path / "inproc"), ArtifactPaths(tmp_path / "dask")
    run_prepare(config(photos, ann, chunk_images=2, on_bad_image="skip"), a)
    summary = run_prepare(config(photos, ann, chunk_images=2, on_bad_image="skip", workers=2, cluster_min_images=0), b)
    assert summary["bad_images"] == 1
    ca, cb = open_image_cache(a.images), open_image_cache(b.images)
    assert ca.attrs["fingerprint"] == cb.attrs["fingerprint"]
    for split in ca.splits:
        np.testing.assert_array_equal(ca.split(split), cb.split(split))
    assert (a.index_dir / "bad_images.json").read_text() == (b.index_dir / "bad_images.json").read_text()
