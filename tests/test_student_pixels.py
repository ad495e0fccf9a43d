"""One function makes the student's pixels (pipeline/data/pixels.py) for prepare's cache, search queries and folder
galleries: every image of a gallery, queried as an image file, ranks itself first with the score of its own
cache row, in every `prepare.image` mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from deploy_helpers import tiny_student
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.pixels import PixelRecipe, ResizeConfig, decode_image
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.search.gallery import student_recipe
from pipeline.store.image_cache import open_image_cache
from pipeline.towers.student import save_student
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

# (file name, size): wide, tall and square; PNG and JPEG; a JPEG large enough to be DCT-drafted at resize 28;
# palette, grey and RGBA images (converted to RGB); one JPEG with an EXIF orientation tag (6: turn a quarter)
IMAGES = [
    ("wide.png", (90, 40)),
    ("tall.png", (36, 80)),
    ("square.jpg", (50, 50)),
    ("big.jpg", (240, 150)),
    ("palette.png", (64, 48)),
    ("grey.png", (48, 64)),
    ("alpha.png", (70, 52)),
    ("phone.jpg", (80, 60)),
    ("wide2.jpg", (120, 45)),
    ("tall2.png", (40, 100)),
]


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Random colour blobs (a 6 x 6 grid upsampled): a crop, a squash and a rotation of it are different pictures."""
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return grid.resize(size, Image.BICUBIC)


def make_dataset(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for name, size in IMAGES:
        img = smooth_image(rng, size)
        path = root / "images" / name
        if name.startswith("palette"):
            img = img.convert("P", palette=Image.ADAPTIVE, colors=32)
        elif name.startswith("grey"):
            img = img.convert("L")
        elif name.startswith("alpha"):
            img = img.convert("RGBA")
        if name == "phone.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(path, exif=exif.tobytes(), quality=90)
        else:
            img.save(path, **({"quality": 90} if name.endswith(".jpg") else {}))
    entries = [
        {"filename": name, "split": "test" if i % 3 else "train", "sentences": [{"raw": f"picture {i}"}]}
        for i, (name, _) in enumerate(IMAGES)
    ]
    (root / "ann.json").write_text(json.dumps({"images": entries}))
    return DatasetConfig(name="shapes", annotations=root / "ann.json", image_root=root / "images")


RECIPES = [
    ("squash", "ignore"),
    ("shorter_side_center_crop", "ignore"),
    ("shorter_side_center_crop", "apply"),
    ("squash", "apply"),
]


@pytest.mark.parametrize("mode,exif", RECIPES)
def test_every_gallery_image_queried_as_itself_ranks_first(tokenizer_dir, tmp_path, mode, exif):
    from dataclasses import replace

    dataset = replace(make_dataset(tmp_path), exif_orientation=exif)
    paths = ArtifactPaths(tmp_path / "work")
    rc = ResizeConfig(mode=mode, resize=28, crop=24)  # the student (16 px) resizes the 24 px rows itself
    run_prepare(PrepareConfig(dataset=dataset, image=rc, workers=1), paths)
    cache = open_image_cache(paths.images)
    recipe = PixelRecipe.of_cache(cache.attrs, "cache")
    assert recipe == PixelRecipe(rc, exif)
    # a student that records its recipe (as distill saves it) and one saved before students did (the workdir's
    # cache tells): both decode queries as the cache's rows were made
    save_student(tiny_student(tokenizer_dir, 0), paths.student, pixels=recipe.describe())
    save_student(tiny_student(tokenizer_dir, 0), paths.workdir / "older")
    assert student_recipe(paths.workdir / "older", paths) == student_recipe(paths.student, paths) == recipe
    run = CliRunner().invoke
    student = paths.student if mode == "squash" else paths.workdir / "older"
    common = ["--workdir", str(paths.workdir), "--student", str(student)]
    result = run(app, ["index", "--split", "all", *common])
    assert result.exit_code == 0, result.output
    for name, _ in IMAGES:
        result = run(app, ["search", "--image", str(tmp_path / "images" / name), "-k", "2", "--split", "all", *common])
        assert result.exit_code == 0, result.output
        first = [line.strip().split("  ") for line in result.output.splitlines() if line.startswith("  1  ")][0]
        assert first[3] == name, (mode, exif, name, result.output)  # rank, score, split, id, captions
        assert float(first[1]) == pytest.approx(1.0, abs=1e-5)  # the very pixels of its cache row


@pytest.mark.parametrize("mode,exif", RECIPES)
def test_decode_image_is_the_cache_row(tmp_path, mode, exif):
    """The oracle without a model: prepare's row of every image equals decode_image of its file, pixel for pixel."""
    from dataclasses import replace

    dataset = replace(make_dataset(tmp_path), exif_orientation=exif)
    paths = ArtifactPaths(tmp_path / "work")
    rc = ResizeConfig(mode=mode, resize=28, crop=24)
    run_prepare(PrepareConfig(dataset=dataset, image=rc, workers=1), paths)
    cache = open_image_cache(paths.images)
    from pipeline.data.index import DatasetIndex

    index = DatasetIndex.load(paths.index_dir)
    for split in index.splits:
        view = index.split(split)
        for row, path in enumerate(view.image_path):
            np.testing.assert_array_equal(cache.split(split)[row], decode_image(path, rc, exif))


def test_a_student_with_other_pixels_than_the_cache_is_refused(tokenizer_dir, tmp_path):
    """A split gallery is the cache's rows: a student trained on other pixels cannot search it (one line)."""
    dataset = make_dataset(tmp_path)
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(PrepareConfig(dataset=dataset, image=ResizeConfig(mode="squash", crop=24), workers=1), paths)
    other = PixelRecipe(ResizeConfig(resize=28, crop=24))
    save_student(tiny_student(tokenizer_dir, 0), paths.student, pixels=other.describe())
    result = CliRunner().invoke(app, ["search", "picture", "--workdir", str(paths.workdir)])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("error: shapes split test: its images were prepared as squash:")
    assert "trained on shorter side resized to 28, then the centre 24 x 24 crop, bilinear filter" in last


def test_recorded_recipes_are_checked():
    good = PixelRecipe(ResizeConfig(mode="squash", crop=32))
    assert PixelRecipe.of_student({"image": {"pixels": good.describe()}}, "s") == good
    assert PixelRecipe.of_student({"image": {}}, "s") is None  # a student saved before they recorded it
    with pytest.raises(InputError, match="no image recipe this kdpipe can reproduce"):
        PixelRecipe.of_cache({"resize": {}}, "cache")  # a cache written by a tool that records none
    with pytest.raises(InputError, match="invalid image recipe"):
        PixelRecipe.of_cache({"resize": {**good.image.describe(), "crop": 0}}, "cache")
