"""One image reader for every stage (pipeline/data/image_file.py): the decompression-bomb guard holds in prepare,
extract, fit-teacher, `search --image` and `index --folder` alike, whatever PIL's global says; 16-bit and float
images are read by their range (Pillow's convert("RGB") turns them white and black), or refused in one line."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_error_line, run_cli
from deploy_helpers import tiny_workdir
from PIL import Image

from pipeline.data.image_file import MAX_PIXELS, BadImage, read_rgb
from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.store.image_cache import open_image_cache

S = 16  # side of the small test images (resize = crop = S: the cache row is the decoded image itself)
# kdpipe's guard names width and height; PIL's, where it fires first, the pixel count only
BOMB = r"too large to decode safely \((20,000 x 10,000 = )?200,000,000 pixels, more than 178,956,970\); scale it down"


def png_bomb(path: Path, width: int = 20_000, height: int = 10_000) -> Path:
    """A PNG of a few hundred bytes whose header declares width x height 8-bit grey pixels (2e8 > MAX_PIXELS)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(params=["pil-guard-on", "pil-guard-off"])
def pil_guard(request, monkeypatch):
    """PIL's own guard as shipped, and switched off by some other library: kdpipe's holds either way."""
    if request.param == "pil-guard-off":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    return request.param


def test_the_bomb_is_refused_from_its_header_by_the_reader(tmp_path, pil_guard):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200 and 20_000 * 10_000 > MAX_PIXELS
    with pytest.raises(BadImage, match=rf"^{bomb}: {BOMB}$"):
        read_rgb(bomb)  # extract's and fit-teacher's reader
    with pytest.raises(BadImage, match=rf"^{bomb}: {BOMB}$"):
        decode_image(bomb, ResizeConfig())  # prepare's and search's


def test_prepare_refuses_or_skips_the_bomb(tmp_path, pil_guard):
    root = tmp_path / "imgs"
    root.mkdir()
    png_bomb(root / "bomb.png")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "ok.png")
    images = [
        {"filename": name, "split": "train", "sentences": [{"raw": f"{name} caption"}]}
        for name in ("ok.png", "bomb.png")
    ]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images}))
    cfg = PrepareConfig(dataset=DatasetConfig(annotations=tmp_path / "ann.json", image_root=root), workers=1)
    with pytest.raises(InputError, match=rf"bomb.png: {BOMB}"):
        run_prepare(cfg, ArtifactPaths(tmp_path / "w1"))
    summary = run_prepare(PrepareConfig(**{**cfg.__dict__, "on_bad_image": "skip"}), ArtifactPaths(tmp_path / "w2"))
    assert summary["bad_images"] == 1
    (report,) = json.loads((tmp_path / "w2/index/bad_images.json").read_text())
    assert report["image_id"] == "bomb.png" and re.fullmatch(BOMB, report["reason"])


@pytest.mark.usefixtures("one_thread")
def test_search_image_and_index_folder_refuse_the_bomb_in_one_line(tokenizer_dir, tmp_path, pil_guard):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    folder = tmp_path / "photos"
    folder.mkdir()
    bomb = png_bomb(folder / "bomb.png")
    line = one_error_line(run_cli("search", "--image", bomb, "--workdir", paths.workdir))
    assert re.fullmatch(rf"error: {bomb}: {BOMB}", line), line
    line = one_error_line(run_cli("index", "--workdir", paths.workdir, "--folder", folder, "--index", tmp_path / "ix"))
    assert re.fullmatch(rf"error: {bomb}: {BOMB}", line), line
    assert not (tmp_path / "ix").exists()


def test_fit_teacher_reads_its_images_through_the_guarded_reader(tmp_path, pil_guard):
    from pipeline.teachers.fit_teacher import frozen_features

    class NoTowers:  # the bomb is refused before any tower would run
        def preprocess_image(self, image):
            raise AssertionError("decoded")

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(BadImage, match=BOMB):
        frozen_features(NoTowers(), [png_bomb(tmp_path / "bomb.png")], [], batch_size=4)


# -- high bit depth and float images ----------------------------------------------------------------------
def gradient16() -> np.ndarray:
    """uint16 [S, S] covering 0..65535, both ends and the rounding midpoints included."""
    values = np.linspace(0, 65535, S * S).round().astype(np.uint16)
    values[1], values[2] = 128, 129  # 128 * 255 / 65535 = 0.498 -> 0; 129 -> 0.502 -> 1
    return values.reshape(S, S)


def expect_rgb(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[..., None], 3, axis=2)


def test_a_16_bit_png_is_read_by_its_range_not_saturated(tmp_path):
    values = gradient16()
    Image.fromarray(values).save(tmp_path / "g16.png")  # a real 16-bit greyscale PNG
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I") and (np.asarray(im.convert("RGB")) == 255).mean() > 0.95  # the bug: white
    oracle = expect_rgb(np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))
    assert oracle[0, 1, 0] == 0 and oracle[0, 2, 0] == 1 and oracle[-1, -1, 0] == 255
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "g16.png")), oracle)  # extract, fit-teacher
    np.testing.assert_array_equal(decode_image(tmp_path / "g16.png", ResizeConfig(resize=S, crop=S)), oracle)


def test_a_float_tiff_in_0_1_is_read_by_its_range_not_black(tmp_path):
    values = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    Image.fromarray(values).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F" and np.asarray(im.convert("RGB")).max() <= 1  # the bug: black
    oracle = expect_rgb(np.round(values.astype(np.float64) * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "f.tif")), oracle)
    np.testing.assert_array_equal(decode_image(tmp_path / "f.tif", ResizeConfig(resize=S, crop=S)), oracle)


@pytest.mark.parametrize(
    "values, reason",
    [
        (np.full((S, S), 200.0, np.float32), r"float pixels from 200 to 200, not in \[0, 1\]"),
        (np.where(np.eye(S, dtype=bool), np.nan, 0.5).astype(np.float32), r"float pixels from 0\.5 to 0\.5.*NaN"),
        (np.full((S, S), 1_000_000, np.int32), r"32-bit pixels from 1000000 to 1000000, outside the 16-bit range"),
        (np.full((S, S), -5, np.int32), r"32-bit pixels from -5 to -5, outside the 16-bit range"),
    ],
    ids=["float-0-255", "float-nan", "int32-large", "int32-negative"],
)
def test_an_image_with_no_range_to_read_it_by_is_refused_in_one_line(tmp_path, values, reason):
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(BadImage, match=rf"^{path}: {reason}"):
        read_rgb(path)
    with pytest.raises(BadImage, match=rf"^{path}: {reason}"):
        decode_image(path, ResizeConfig())


def test_prepare_caches_high_bit_depth_images_by_their_range(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    values16 = gradient16()
    Image.fromarray(values16).save(root / "g16.png")
    floats = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    Image.fromarray(floats).save(root / "f.tif")
    Image.fromarray(values16.astype(np.int32)).save(root / "i32.tif")  # mode I with 16-bit values
    names = ["g16.png", "f.tif", "i32.tif"]
    images = [{"filename": n, "split": "train", "sentences": [{"raw": f"{n} caption"}]} for n in names]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images}))
    ds = DatasetConfig(annotations=tmp_path / "ann.json", image_root=root)
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(PrepareConfig(dataset=ds, image=ResizeConfig(resize=S, crop=S), workers=1), paths)
    rows = open_image_cache(paths.images).split("train")
    g16 = expect_rgb(np.floor(values16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(rows[0], g16)
    np.testing.assert_array_equal(rows[1], expect_rgb(np.round(floats.astype(np.float64) * 255).astype(np.uint8)))
    np.testing.assert_array_equal(rows[2], g16)


def test_a_shard_member_goes_through_the_same_guards(tmp_path, pil_guard):
    """Images inside a webdataset shard (pipeline/data/image_source.py) are read by the same reader."""
    import tarfile

    from pipeline.data.image_source import ImageRef

    png_bomb(tmp_path / "bomb.png")
    Image.fromarray(gradient16()).save(tmp_path / "g16.png")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name in ("bomb.png", "g16.png"):
            tar.add(tmp_path / name, arcname=f"000/{name}")
    with tarfile.open(tmp_path / "shard.tar") as tar:
        refs = {
            m.name: ImageRef(str(tmp_path / "shard.tar"), "tar", m.name, m.offset_data, m.size)
            for m in tar.getmembers()
        }
    with pytest.raises(BadImage, match=rf"^{tmp_path / 'shard.tar'} member 000/bomb\.png: {BOMB}$"):
        read_rgb(refs["000/bomb.png"])
    oracle = expect_rgb(np.floor(gradient16().astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(read_rgb(refs["000/g16.png"])), oracle)
    np.testing.assert_array_equal(decode_image(refs["000/g16.png"], ResizeConfig(resize=S, crop=S)), oracle)


def test_prepare_over_parquet_image_bytes_uses_the_same_guards(tmp_path, pil_guard):
    """Images held as bytes in a parquet column (Hugging Face datasets' {"bytes", "path"} struct) are decoded by
    the same reader: the bomb is skipped with the same reason, the 16-bit image cached by its range."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(save) -> bytes:
        buf = io.BytesIO()
        save(buf)
        return buf.getvalue()

    cells = [
        {"bytes": png(lambda b: Image.fromarray(gradient16()).save(b, format="PNG")), "path": "g16.png"},
        {"bytes": png_bomb(tmp_path / "bomb.png").read_bytes(), "path": "bomb.png"},
    ]
    pq.write_table(pa.table({"image": cells, "caption": ["grey", "bomb"]}), tmp_path / "d.parquet")
    ds = DatasetConfig(format="parquet", annotations=tmp_path / "d.parquet", image_root=tmp_path, default_split="train")
    paths = ArtifactPaths(tmp_path / "work")
    cfg = PrepareConfig(dataset=ds, image=ResizeConfig(resize=S, crop=S), workers=1, on_bad_image="skip")
    assert run_prepare(cfg, paths)["bad_images"] == 1
    (report,) = json.loads((tmp_path / "work/index/bad_images.json").read_text())
    assert re.fullmatch(BOMB, report["reason"]), report
    (row,) = open_image_cache(paths.images).split("train")
    np.testing.assert_array_equal(
        row, expect_rgb(np.floor(gradient16().astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))
    )
