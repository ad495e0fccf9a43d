"""The compressed image cache (prepare.cache.format webp / jpeg): rows equal the raw cache's (webp) or come
close (jpeg), it is readable with zarr + PIL alone, bad images are left out, and distill trains and resumes on
it exactly as on the raw cache."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.errors import ConfigError
from pipeline.paths import ArtifactPaths
from pipeline.store.image_cache import open_image_cache, write_image_cache


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six real-looking images (smooth gradients and noise, JPEG and PNG), two splits, one JSONL."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    lines = []
    for i in range(6):
        base = np.stack([xx * (1 + i), yy * 2, (xx + yy) * (3 - i % 3)], -1) % 256
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        name = f"p{i}.jpg" if i % 2 else f"p{i}.png"
        Image.fromarray(pixels).save(root / name, **({"quality": 92} if i % 2 else {}))
        lines.append({"image": name, "caption": f"photo {i}", "split": "train" if i < 4 else "test"})
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def prepare(photos: Path, work: Path, cache: dict | None = None, **kw) -> ArtifactPaths:
    raw = {
        "dataset": {"name": "p", "format": "jsonl", "annotations": str(photos / "d.jsonl")},
        "image": {"resize": 40, "crop": 32},
        "chunk_images": 2,
        **({"cache": cache} if cache else {}),
        **kw,
    }
    paths = ArtifactPaths(work)
    run_prepare(from_dict(PrepareConfig, raw, "prepare"), paths)
    return paths


def test_webp_rows_equal_the_raw_cache_and_jpeg_rows_come_close(photos, tmp_path):
    raw = open_image_cache(prepare(photos, tmp_path / "raw").images)
    webp = open_image_cache(prepare(photos, tmp_path / "webp", {"format": "webp"}).images)
    jpeg = open_image_cache(prepare(photos, tmp_path / "jpeg", {"format": "jpeg", "quality": 95}).images)
    assert (
        raw.encoding is None
        and webp.encoding == {"format": "webp"}
        and jpeg.encoding == {"format": "jpeg", "quality": 95}
    )
    for split in ("train", "test"):
        r, w, j = raw.split(split), webp.split(split), jpeg.split(split)
        assert w.shape == r.shape and len(w) == len(r)
        assert np.array_equal(np.asarray(w), np.asarray(r))  # lossless
        assert np.array_equal(w[1], r[1]) and np.array_equal(w[[1, 0]], r[[1, 0]]) and np.array_equal(w[:1], r[:1])
        out = np.empty((2, *r.shape[1:]), np.uint8)
        np.take(w, [1, 0], axis=0, out=out)  # how distill's loader threads gather small rows
        assert np.array_equal(out, r[[1, 0]])
        err = np.asarray(j).astype(np.float64) - np.asarray(r)
        psnr = 10 * np.log10(255**2 / np.mean(err**2))
        assert 35 < psnr < 80, psnr  # lossy, but close
        assert w.nbytes_encoded < r.nbytes and j.nbytes_encoded < w.nbytes_encoded


def test_an_encoded_split_reads_with_zarr_and_pil_alone(photos, tmp_path):
    import zarr

    paths = prepare(photos, tmp_path / "w", {"format": "webp"})
    raw = open_image_cache(prepare(photos, tmp_path / "raw").images)
    g = zarr.open_group(paths.images, mode="r")
    offsets = g["test/offsets"][...]
    for i in range(len(offsets) - 1):
        data = g["test/encoded"][offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "WEBP" and np.array_equal(np.asarray(im.convert("RGB")), raw.split("test")[i])


def test_bad_images_are_left_out_of_an_encoded_cache(photos, tmp_path):
    import shutil

    broken = tmp_path / "photos"
    shutil.copytree(photos, broken)
    (broken / "p1.jpg").write_bytes(b"not an image")
    paths = prepare(broken, tmp_path / "w", {"format": "webp"}, on_bad_image="skip")
    raw = open_image_cache(prepare(photos, tmp_path / "raw").images)
    train = open_image_cache(paths.images).split("train")
    assert len(train) == 3 and np.array_equal(np.asarray(train), raw.split("train")[[0, 2, 3]])


def test_changing_the_format_rebuilds_and_an_unchanged_rerun_keeps_it(photos, tmp_path):
    cfg = {
        "dataset": {"name": "p", "format": "jsonl", "annotations": str(photos / "d.jsonl")},
        "image": {"resize": 40, "crop": 32},
    }
    paths = ArtifactPaths(tmp_path / "w")
    assert (
        run_prepare(from_dict(PrepareConfig, {**cfg, "cache": {"format": "webp"}}, "prepare"), paths)["status"]
        == "written"
    )
    assert (
        run_prepare(from_dict(PrepareConfig, {**cfg, "cache": {"format": "webp"}}, "prepare"), paths)["status"]
        == "unchanged"
    )
    assert run_prepare(from_dict(PrepareConfig, cfg, "prepare"), paths)["status"] == "written"
    assert open_image_cache(paths.images).encoding is None
    with pytest.raises(ConfigError, match="prepare.cache.format: 'png' is not one of"):
        from_dict(PrepareConfig, {**cfg, "cache": {"format": "png"}}, "prepare")


@pytest.mark.slow
def test_distill_on_a_webp_cache_trains_and_resumes_as_on_the_raw_cache(tmp_path):
    """Lossless rows decoded in the loader threads: a run killed and resumed on the webp cache ends equal to the
    uninterrupted one (tests/test_train.py's check), and equal bit for bit to the same run on the raw cache."""
    from test_train import kill_resume_and_compare, make_workdir, tiny_cfg

    from pipeline.distill.run import run_distill
    from pipeline.store.features import open_store

    root = tmp_path / "d"
    index = make_workdir(root)
    raw = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    pixels = {s: np.asarray(raw.split(s)) for s in raw.splits}
    write_image_cache(root / "webp.zarr", pixels, fingerprint=index.fingerprint, encoding={"format": "webp"})
    webp = open_image_cache(root / "webp.zarr", expect_fingerprint=index.fingerprint)
    store = open_store(root / "features.zarr")
    cfg = tiny_cfg(root, epochs=2, checkpoint_every_steps=4, augment={"enabled": True}, batch_size=4, grad_accum=2)
    with torch.inference_mode(False):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # the CPU kernels' results must not depend on the thread count
        try:
            on_webp = kill_resume_and_compare((root, index, store, webp), "webp-", cfg)
            run_distill(cfg, index=index, store=store, cache=raw, out_dir=root / "raw")
        finally:
            torch.set_num_threads(previous)
    on_raw = torch.load(root / "raw" / "checkpoints" / "last.pt")
    for k, v in on_raw["model"].items():
        assert torch.equal(v, on_webp["model"][k]), k


def test_an_encoded_row_is_checked_by_its_declared_size_before_it_is_decoded(tmp_path, monkeypatch):
    """The cache's reader has the decompression-bomb guard too: a row whose bytes were replaced by a PNG declaring
    20,000 x 10,000 pixels is refused from its header (PIL's own guard switched off, as another library may),
    and bytes that are no image are one line, not PIL's exception from a loader thread."""
    from test_image_file import png_bomb

    from pipeline.errors import InputError
    from pipeline.store.encoded_cache import EncodedImages, encode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    good = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rows = [encode_image(good, {"format": "webp"}), png_bomb(tmp_path / "bomb.png").read_bytes(), b"no image"]
    offsets = np.cumsum([0] + [len(r) for r in rows])
    images = EncodedImages(np.frombuffer(b"".join(rows), np.uint8), offsets, (8, 8))
    np.testing.assert_array_equal(images[0], good)  # lossless webp
    with pytest.raises(InputError, match=r"^an encoded cache row declares 20000 x 10000 pixels, expected 8 x 8; "):
        images[1]
    with pytest.raises(InputError, match=r"^an encoded cache row cannot be decoded \(UnidentifiedImageError: "):
        images[2]
