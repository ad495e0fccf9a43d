"""The built-in demo's data: committed captions (Karpathy format) and the image builder (package photos)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo_photos import DEMO_IMAGES, DEMO_JSON, build_demo_images, load_source, render
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def needs_photo_packages() -> None:
    """The demo photos ship in scikit-image and scikit-learn (demo extras): the tests that draw them skip
    without; the committed captions and the source table are checked everywhere."""
    pytest.importorskip("skimage", reason="the demo images need the demo extras (scikit-image)")
    pytest.importorskip("sklearn", reason="the demo images need the demo extras (scikit-learn)")


@pytest.fixture(scope="module")
def dataset() -> dict:
    return json.loads((ROOT / DEMO_JSON).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[Path]]:
    needs_photo_packages()
    out = tmp_path_factory.mktemp("demo_images")
    return out, build_demo_images(out)


# -- the committed captions ------------------------------------------------------------------------------
def test_karpathy_structure(dataset):
    images = dataset["images"]
    assert len(images) >= 20
    assert [im["imgid"] for im in images] == list(range(len(images)))
    filenames = [im["filename"] for im in images]
    assert len(set(filenames)) == len(filenames)
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert len(set(sentids)) == len(sentids)
    for im in images:
        assert im["split"] in ("train", "val", "test")
        # every caption references its image
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert all(s["imgid"] == im["imgid"] for s in im["sentences"])


def test_every_image_has_five_distinct_captions(dataset):
    for im in dataset["images"]:
        raws = [s["raw"].strip() for s in im["sentences"]]
        assert len(raws) >= 5, im["filename"]
        assert all(len(r.split()) >= 3 for r in raws), im["filename"]
        assert len({r.lower() for r in raws}) == len(raws), f"{im['filename']}: repeated caption"
    all_raws = [s["raw"].strip().lower() for im in dataset["images"] for s in im["sentences"]]
    assert len(set(all_raws)) == len(all_raws), "a caption is shared by two images"


def test_json_matches_builder(dataset):
    assert [im["filename"] for im in dataset["images"]] == [d.filename for d in DEMO_IMAGES]
    for im, d in zip(dataset["images"], DEMO_IMAGES):
        assert im["source"] == d.source
        assert (tuple(im["crop"]) if "crop" in im else None) == d.crop


def test_splits_disjoint_and_no_photo_shared_across_splits(dataset):
    splits = {im["split"] for im in dataset["images"]}
    assert splits == {"train", "val", "test"}
    by_split = defaultdict(set)
    for im in dataset["images"]:
        by_split[im["split"]].add(im["filename"])
    names = [n for s in by_split.values() for n in s]
    assert len(names) == len(set(names))
    # a crop or a stereo view shows the same photo: all images of one source photo share one split
    split_of = {d.filename: s for s, files in by_split.items() for d in DEMO_IMAGES if d.filename in files}
    groups = defaultdict(set)
    for d in DEMO_IMAGES:
        groups[d.group].add(split_of[d.filename])
    leaks = {g: s for g, s in groups.items() if len(s) > 1}
    assert not leaks, f"photos split across splits: {leaks}"
    n = len(dataset["images"])
    assert len(by_split["test"]) >= 5 and len(by_split["val"]) >= 4 and len(by_split["train"]) >= n // 2


# -- the image builder ------------------------------------------------------------------------------------
def test_builder_writes_every_image_and_they_load(built):
    out, files = built
    assert files == [out / d.filename for d in DEMO_IMAGES]
    for d, path in zip(DEMO_IMAGES, files):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            assert min(im.size) >= 100
            if d.crop is not None:
                left, top, right, bottom = d.crop
                assert im.size == (right - left, bottom - top)


def test_builder_is_deterministic(built, tmp_path):
    out, files = built
    again = build_demo_images(tmp_path)
    for a, b in zip(files, again):
        assert a.read_bytes() == b.read_bytes(), a.name
    # and rebuilding in place replaces the files with the same bytes
    before = {p.name: p.read_bytes() for p in files[:3]}
    build_demo_images(out, DEMO_IMAGES[:3])
    assert {p.name: p.read_bytes() for p in files[:3]} == before


def test_grayscale_and_transparent_sources_become_rgb():
    needs_photo_packages()
    gray = render(next(d for d in DEMO_IMAGES if d.source == "skimage:camera"))
    assert gray.mode == "RGB"
    logo = render(next(d for d in DEMO_IMAGES if d.source == "skimage:logo"))
    assert logo.mode == "RGB" and logo.getpixel((0, 0)) == (255, 255, 255)  # transparency over white


def test_unknown_sources_are_input_errors():
    with pytest.raises(InputError, match="unknown demo image source"):
        load_source("opencv:baboon.jpg")


def test_a_scikit_image_image_that_needs_a_download_is_an_input_error():
    needs_photo_packages()
    with pytest.raises(InputError, match="ship in the package"):
        load_source("skimage:eagle")


@pytest.mark.parametrize(
    "source, pip_name", [("skimage:camera", "scikit-image"), ("sklearn:china.jpg", "scikit-learn")]
)
def test_a_missing_photo_package_says_to_install_the_demo_extras(monkeypatch, source, pip_name):
    package = source.split(":")[0]
    # what import sees where it is not installed; its submodules too, which an earlier test may have imported
    # (`from sklearn.datasets import ...` finds a cached sklearn.datasets without looking at sklearn)
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] or [package]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InputError, match=rf"need the package {pip_name} .*pip install -e '\.\[demo\]'"):
        load_source(source)


def test_stage_command_writes_the_images(tmp_path):
    needs_photo_packages()
    import typer
    from typer.testing import CliRunner

    from stages import demo_data

    app = typer.Typer()
    app.command()(demo_data.command)
    result = CliRunner().invoke(app, ["--photos", "--out", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert f"wrote {len(DEMO_IMAGES)} demo images" in result.output
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == sorted(d.filename for d in DEMO_IMAGES)
