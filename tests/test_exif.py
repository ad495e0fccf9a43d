"""EXIF orientation: read from the header, applied only when the dataset asks for it, and the same pixels
for the student's image cache (prepare) and the teacher (extract)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.data.exif import orientation, upright
from pipeline.data.image_file import read_rgb
from pipeline.data.index import DatasetIndex
from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig
from pipeline.paths import ArtifactPaths
from pipeline.store.image_cache import open_image_cache


def photo(size=(400, 300)) -> Image.Image:
    """A real, asymmetric photo (a rotation or mirror of it is never the same image); the tests that use one
    skip without the demo extras."""
    skimage_data = pytest.importorskip("skimage.data", reason="the real test photo ships with scikit-image")
    return Image.fromarray(skimage_data.astronaut()).resize(size, Image.BILINEAR)


def tagged(path: Path, image: Image.Image, tag: int | None, **save) -> Path:
    exif = Image.Exif()
    if tag is not None:
        exif[0x0112] = tag
    image.save(path, exif=exif.tobytes(), **save)
    return path


@pytest.mark.parametrize("tag", range(1, 9))
def test_upright_matches_pillows_exif_transpose(tmp_path, tag):
    path = tagged(tmp_path / f"t{tag}.png", photo(), tag)
    with Image.open(path) as im:
        assert orientation(im) == tag
        ours = upright(im.convert("RGB"), orientation(im))
        reference = ImageOps.exif_transpose(im).convert("RGB")  # Pillow's own reading of the same tag
    assert ours.size == reference.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    if tag in (5, 6, 7, 8):
        assert ours.size == (300, 400)  # a quarter turn: landscape stored, portrait shown


def test_orientation_without_or_with_a_bad_tag_is_as_stored(tmp_path):
    with Image.open(tagged(tmp_path / "none.jpg", photo(), None)) as im:
        assert orientation(im) == 1
    with Image.open(tagged(tmp_path / "bad.jpg", photo(), 9)) as im:
        assert orientation(im) == 1
    photo().save(tmp_path / "plain.jpg")
    with Image.open(tmp_path / "plain.jpg") as im:
        assert orientation(im) == 1


@pytest.mark.parametrize("draft", [False, True])
def test_prepare_decodes_as_the_upright_image_only_when_asked(tmp_path, draft):
    stored = photo((800, 600))  # >= 2x the target: draft mode would kick in for an untagged JPEG
    path = tagged(tmp_path / "sideways.png", stored, 6)
    rc = ResizeConfig(draft=draft)
    shown = stored.transpose(Image.Transpose.ROTATE_270)
    shown.save(tmp_path / "upright.png")
    np.testing.assert_array_equal(decode_image(path, rc, exif="apply"), decode_image(tmp_path / "upright.png", rc))
    stored.save(tmp_path / "as_stored.png")
    np.testing.assert_array_equal(decode_image(path, rc), decode_image(tmp_path / "as_stored.png", rc))
    # a JPEG (draft-capable) file: applied means a full decode, then the same resize and crop
    jpeg = tagged(tmp_path / "sideways.jpg", stored, 6, quality=95)
    with Image.open(jpeg) as im:
        im.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright_decoded.png")
    np.testing.assert_array_equal(
        decode_image(jpeg, rc, exif="apply"), decode_image(tmp_path / "upright_decoded.png", rc)
    )


def test_extract_reads_the_same_orientation(tmp_path):
    stored = photo()
    path = tagged(tmp_path / "sideways.jpg", stored, 8, quality=95)
    with Image.open(path) as im:
        as_stored = im.convert("RGB")
    np.testing.assert_array_equal(np.asarray(read_rgb(str(path))), np.asarray(as_stored))
    np.testing.assert_array_equal(
        np.asarray(read_rgb(str(path), exif="apply")), np.asarray(as_stored.transpose(Image.Transpose.ROTATE_90))
    )
    drafted = read_rgb(str(path), draft_size=64, exif="apply")  # a square draft, then the quarter turn
    assert drafted.size[0] < drafted.size[1]


def _dataset(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    root.mkdir()
    tagged(root / "phone.jpg", photo(), 6, quality=95)
    photo((300, 300)).save(root / "plain.jpg", quality=95)
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"filename": name, "split": "train", "sentences": [{"raw": f"a photo {name}"}]}
                    for name in ("phone.jpg", "plain.jpg")
                ]
            }
        )
    )
    return root, ann


def test_prepare_records_the_choice_and_says_what_it_did(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")  # prepare says it through logging (the CLI shows it)
    root, ann = _dataset(tmp_path)
    runs = {}
    for mode in ("ignore", "apply"):
        cfg = PrepareConfig(
            dataset=DatasetConfig(name="phone", annotations=ann, image_root=root, exif_orientation=mode), workers=1
        )
        paths = ArtifactPaths(tmp_path / mode)
        summary = run_prepare(cfg, paths)
        out = caplog.text
        caplog.clear()
        index = DatasetIndex.load(paths.index_dir)
        cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
        assert index.exif_orientation == mode and cache.attrs["exif_orientation"] == mode
        assert summary["exif_tagged"] == 1 and "1 image(s) carry an EXIF orientation tag" in out
        assert ("exif_orientation: apply for phone photos" in out) == (mode == "ignore")
        rc = ResizeConfig()
        np.testing.assert_array_equal(cache.split("train")[0], decode_image(root / "phone.jpg", rc, exif=mode))
        runs[mode] = (index.fingerprint, cache.split("train")[0].copy())
    assert runs["ignore"][0] != runs["apply"][0]  # features of one never pass for the other's
    assert not np.array_equal(runs["ignore"][1], runs["apply"][1])


def test_index_round_trip_and_older_indexes(tmp_path):
    index = DatasetIndex.from_lists("d", tmp_path, [("a", "a.jpg", "train")], [("a cat", 0)], exif_orientation="apply")
    index.save(tmp_path / "index")
    assert DatasetIndex.load(tmp_path / "index").exif_orientation == "apply"
    assert index.drop_images([]).exif_orientation == "apply"
    plain = DatasetIndex.from_lists("d", tmp_path, [("a", "a.jpg", "train")], [("a cat", 0)])
    plain.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["exif_orientation"]  # written before the option existed
    meta_path.write_text(json.dumps(meta))
    old = DatasetIndex.load(tmp_path / "old")
    assert old.exif_orientation == "ignore" and old.fingerprint == plain.fingerprint != index.fingerprint
    with pytest.raises(ValueError, match="exif_orientation"):
        DatasetIndex.from_lists("d", tmp_path, [("a", "a.jpg", "train")], [("a cat", 0)], exif_orientation="yes")
