"""View-matched targets (issue 20 §1): the boxes, the teacher's rendering of a view against hand-computed regions and
the student's own frame, the views store (`kdpipe views`) against the teacher called directly and the main store,
its resumption and its readers; and in distill, the student's crop of a box, the view choice, the rows the loader
gives, and kill/resume bit for bit with views."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from extract_helpers import TinyTeacher, make_dataset, store_files
from PIL import Image
from test_train import make_workdir, tiny_cfg

from pipeline.data.pixels import PixelRecipe, ResizeConfig, image_pixels
from pipeline.distill.data import BatchLoader, TeacherBank, Unpaired, tokenize_all
from pipeline.distill.run import run_distill
from pipeline.distill.sampler import EpochSampler, UnpairedSampler
from pipeline.distill.views import ViewChoice, crop_boxes, view_of
from pipeline.errors import ConfigError, InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.extract.views import ViewsConfig, frame_in_source, render_view, view_boxes
from pipeline.extract.views_store import run_views
from pipeline.store.features import open_store
from pipeline.store.image_cache import open_image_cache
from pipeline.store.views import ViewTargets, open_views
from pipeline.towers.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)
SQUASH = PixelRecipe(ResizeConfig(mode="squash", crop=16))
VIEWS = ViewsConfig(count=3, seed=5)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


# -- the boxes and the teacher's view ---------------------------------------------------------------------
def test_boxes_lie_in_the_frame_view_0_is_the_frame_and_a_row_keeps_its_boxes():
    cfg = ViewsConfig(count=4, scale=(0.3, 0.6), ratio=(0.5, 2.0), seed=1)
    b = view_boxes(cfg, range(200))
    assert b.dtype == np.float32 and b.shape == (200, 4, 5)
    assert (b[:, 0] == np.array([0, 0, 1, 1, 0], np.float32)).all()
    x0, y0, w, h, flip = np.moveaxis(b[:, 1:], -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1).all() and (y0 + h <= 1).all()
    area, aspect = w * h, w / h
    assert (area > 0.3 - 1e-6).all() and (area < 0.6 + 1e-6).all()
    assert (aspect > 0.5 - 1e-5).all() and (aspect < 2.0 + 1e-5).all()
    assert 0.35 < flip.mean() < 0.65 and set(np.unique(flip)) == {0.0, 1.0}
    # a row's boxes depend on (seed, row) only: not on how many rows there are
    assert np.array_equal(view_boxes(cfg, [137])[0], b[137])
    assert not np.array_equal(view_boxes(replace(cfg, seed=2), [137])[0], b[137])
    assert (view_boxes(replace(cfg, flip=False), range(50))[..., 4] == 0).all()


def test_a_view_is_the_hand_computed_region_of_the_source():
    """A 40 x 30 image, the method's recipe shorter side 20 -> (26, 20), centre crop 16 at (5, 2): the frame in
    source pixels is x 5 * 40/26 .. + 16 * 40/26, y 2 * 1.5 .. + 16 * 1.5; a box of it is cut from there."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    recipe = ResizeConfig(mode="shorter_side_center_crop", resize=20, crop=16)
    fx = 40 / 26
    assert frame_in_source(recipe, 40, 30) == pytest.approx((5 * fx, 3.0, 16 * fx, 24.0))
    box = np.array([0.25, 0.5, 0.5, 0.25, 0.0], np.float32)
    left, top, w, h = 5 * fx + 0.25 * 16 * fx, 3.0 + 0.5 * 24, 0.5 * 16 * fx, 0.25 * 24
    side = round(max(w, h))
    expected = image.resize((side, side), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    assert np.array_equal(np.asarray(render_view(image, recipe, box)), np.asarray(expected))
    flipped = render_view(image, recipe, np.array([0.25, 0.5, 0.5, 0.25, 1.0], np.float32))
    assert np.array_equal(np.asarray(flipped), np.asarray(expected)[:, ::-1])
    # squash: the frame is the whole image, and view 0 of a square image is the image itself
    assert frame_in_source(ResizeConfig(mode="squash", crop=8), 40, 30) == (0.0, 0.0, 40.0, 30.0)
    square = image.crop((0, 0, 30, 30))
    whole = np.array([0, 0, 1, 1, 0], np.float32)
    assert np.array_equal(
        np.asarray(render_view(square, ResizeConfig(mode="squash", crop=8), whole)), np.asarray(square)
    )


def test_view_0_is_the_region_of_the_students_own_frame():
    """The student's cache row (prepare's recipe) and view 0 at the same size show the same region: far closer
    than the same view moved by 2 source pixels."""
    yy, xx = np.mgrid[0:60, 0:90].astype(np.float64)
    smooth = np.stack([127 + 120 * np.sin(xx / 9), 127 + 120 * np.cos(yy / 7), 127 + 60 * np.sin((xx + yy) / 11)], -1)
    image = Image.fromarray(smooth.astype(np.uint8))
    recipe = ResizeConfig(mode="shorter_side_center_crop", resize=36, crop=32, filter="bicubic")
    student = image_pixels(image, recipe).astype(np.float64)
    view0 = render_view(image, recipe, np.array([0, 0, 1, 1, 0], np.float32))
    as_student = np.asarray(view0.resize((32, 32), Image.Resampling.BICUBIC), np.float64)
    fl, ft, fw, fh = frame_in_source(recipe, 90, 60)
    moved = image.resize((32, 32), Image.Resampling.BICUBIC, box=(fl + 2, ft, fl + 2 + fw, ft + fh))
    near = np.abs(as_student - student).mean()
    assert near < 1.5 and near < np.abs(np.asarray(moved, np.float64) - student).mean() / 3


# -- the views store ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def square_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("views_data")
    index = make_dataset(root, size=(18, 18))
    main = root / "features.zarr"
    run_extract(index, ExtractConfig(**BASE), main, teacher=TinyTeacher())
    return index, root, main


@pytest.fixture(scope="module")
def views_store(square_data):
    index, root, _ = square_data
    out = root / "views.zarr"
    run_views(index, ExtractConfig(**BASE), VIEWS, SQUASH, out, teacher=TinyTeacher(), features=root / "features.zarr")
    return out


def test_the_views_store_holds_the_teacher_called_on_each_view(square_data, views_store):
    index, root, main_path = square_data
    main = open_store(main_path)
    split = index.split("train")
    boxes = zarr.open_group(str(views_store), mode="r")["boxes/train"][...]
    assert np.array_equal(boxes, view_boxes(VIEWS, range(split.n_images)))
    teacher = TinyTeacher()
    for v in range(VIEWS.count):
        sub = open_store(views_store / str(v))  # each view: a complete feature store of its own
        assert sub.splits == ("train",) and sub.teacher["view"]["index"] == v
        rows = sub.split("train")
        assert np.array_equal(np.asarray(rows.text_emb), np.asarray(main.split("train").text_emb))
        if v == 0:  # square images in squash mode: view 0 is the whole image, the main store's rows bit for bit
            assert np.array_equal(np.asarray(rows.image_emb), np.asarray(main.split("train").image_emb))
        for r in (0, 7, split.n_images - 1):
            with Image.open(split.image_path[r]) as im:
                view = render_view(im.convert("RGB"), SQUASH.image, boxes[r, v])
            direct = teacher.encode_image_batch(teacher.preprocess_image(view)[None])[0].numpy().astype(np.float16)
            assert np.array_equal(np.asarray(rows.image_emb[r]), direct), (v, r)
    assert not np.array_equal(
        np.asarray(open_store(views_store / "1").split("train").image_emb), np.asarray(main.split("train").image_emb)
    )
    # the captions' rows were copied from the main store: computing them gives the same bits
    alone = square_data[1] / "views_computed.zarr"
    run_views(index, ExtractConfig(**BASE), replace(VIEWS, count=1), SQUASH, alone, teacher=TinyTeacher())
    computed = open_store(alone / "0").split("train")
    assert np.array_equal(
        np.asarray(computed.text_emb), np.asarray(open_store(views_store / "0").split("train").text_emb)
    )
    group = zarr.open_group(str(views_store), mode="r")  # plain zarr reads it all
    assert group.attrs["complete"] is True and group.attrs["count"] == 3
    assert group["1/train/image_emb"].shape == (split.n_images, 32)


def test_a_failed_views_run_resumes_to_the_same_store_and_a_smaller_count_drops_views(
    square_data, views_store, tmp_path
):
    index = square_data[0]
    out = tmp_path / "views.zarr"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_views(index, ExtractConfig(**BASE), VIEWS, SQUASH, out, teacher=TinyTeacher(fail_after=9))
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    run_views(index, ExtractConfig(**BASE), VIEWS, SQUASH, out, teacher=TinyTeacher())

    def files(p: Path) -> dict[str, bytes]:
        return {k: v for k, v in store_files(p).items() if not k.endswith(".kdpipe-lock")}

    assert files(out) == files(views_store)
    run_views(index, ExtractConfig(**BASE), replace(VIEWS, count=2), SQUASH, out, teacher=TinyTeacher())
    assert not (out / "2").exists() and (out / "1").is_dir()
    assert zarr.open_group(str(out), mode="r")["boxes/train"].shape[1] == 2


class NoTexts(TinyTeacher):
    def encode_text_batch(self, tokens):
        raise AssertionError("the views' captions are the main store's: nothing to compute")


def test_the_views_take_the_captions_of_the_main_store_only_when_it_is_the_same_teachers(square_data, tmp_path):
    index, root, main = square_data
    run_views(index, ExtractConfig(**BASE), VIEWS, SQUASH, tmp_path / "a.zarr", teacher=NoTexts(), features=main)
    other = tmp_path / "other.zarr"
    run_extract(index, ExtractConfig(**BASE), other, teacher=TinyTeacher(seed=4))
    with pytest.raises(AssertionError, match="nothing to compute"):  # another teacher's rows are not taken
        run_views(index, ExtractConfig(**BASE), VIEWS, SQUASH, tmp_path / "b.zarr", teacher=NoTexts(), features=other)


def test_open_views_checks_what_the_boxes_and_rows_belong_to(square_data, views_store, tmp_path):
    main = open_store(square_data[2])
    targets = open_views(views_store, main, "train", SQUASH)
    assert targets.emb.shape == (3, main.split("train").n_images, 32) and targets.count == 3
    other = PixelRecipe(ResizeConfig(mode="shorter_side_center_crop", resize=20, crop=16))
    with pytest.raises(InputError, match="another image recipe"):
        open_views(views_store, main, "train", other)
    with pytest.raises(InputError, match="no views of split 'test'"):
        open_views(views_store, main, "test", SQUASH)
    with pytest.raises(InputError, match="no views store here; run `kdpipe views`"):
        open_views(tmp_path / "none.zarr", main, "train", SQUASH)
    # a store of another teacher's features
    other_main = tmp_path / "other.zarr"
    run_extract(square_data[0], ExtractConfig(**BASE), other_main, teacher=TinyTeacher(seed=3))
    with pytest.raises(InputError, match="another teacher"):
        open_views(views_store, open_store(other_main), "train", SQUASH)


def test_a_folder_of_the_users_is_never_taken_for_a_views_store(square_data, tmp_path):
    mine = tmp_path / "views.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a views store written by kdpipe"):
        run_views(square_data[0], ExtractConfig(**BASE), VIEWS, SQUASH, mine, teacher=TinyTeacher())
    assert (mine / "notes.txt").read_text() == "mine"


# -- in distill ---------------------------------------------------------------------------------------------
def naive_crop(img: torch.Tensor, box) -> torch.Tensor:
    """[3, H, W] -> [3, H, W]: each output pixel's centre mapped into the box, the source sampled bilinearly at
    that point (pixel centres at integer + 0.5, coordinates clamped to the frame), one pixel at a time."""
    _, hgt, wid = img.shape
    x0, y0, w, h, flip = (float(t) for t in box)
    out = torch.empty_like(img, dtype=torch.float64)
    src = img.double()
    for i in range(hgt):
        for j in range(wid):
            u = (j + 0.5) / wid
            u = 1 - u if flip > 0.5 else u
            px = min(max((x0 + u * w) * wid - 0.5, 0.0), wid - 1.0)
            py = min(max((y0 + (i + 0.5) / hgt * h) * hgt - 0.5, 0.0), hgt - 1.0)
            a, b = int(px), int(py)
            a1, b1 = min(a + 1, wid - 1), min(b + 1, hgt - 1)
            fx, fy = px - a, py - b
            top = src[:, b, a] * (1 - fx) + src[:, b, a1] * fx
            bottom = src[:, b1, a] * (1 - fx) + src[:, b1, a1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out.float()


def test_the_students_crop_is_the_box_of_its_frame():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64).float()
    boxes = torch.tensor(
        [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0.5, 0, 0.5, 0.5, 0], [0.1, 0.3, 0.6, 0.45, 1]], dtype=torch.float32
    )
    out = crop_boxes(x, boxes)
    assert torch.equal(out[0], x[0])  # view 0: the student's evaluation input, exactly
    torch.testing.assert_close(out[1], x[1].flip(-1), atol=1e-6, rtol=0)
    for k in (2, 3):
        torch.testing.assert_close(out[k], naive_crop(x[k], boxes[k]), atol=1e-5, rtol=0)


def test_the_view_of_a_row_is_a_function_of_seed_epoch_and_row():
    rows = np.arange(4000)
    v = view_of(3, 1, rows, 4)
    assert v.dtype == np.int64 and v.min() == 0 and v.max() == 3
    assert np.all(np.abs(np.bincount(v, minlength=4) / len(rows) - 0.25) < 0.03)
    assert np.array_equal(view_of(3, 1, rows[::-1], 4), v[::-1])  # per row, in any order
    assert (view_of(3, 2, rows, 4) != v).mean() > 0.6 and (view_of(4, 1, rows, 4) != v).mean() > 0.6
    assert (view_of(0, 0, rows, 1) == 0).all()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("views_distill")
    index = make_workdir(root, unpaired=(6, 0))
    store = open_store(root / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    return root, index, store, cache


def fake_views(store, count: int = 3, seed: int = 0) -> ViewTargets:
    """Views of the training split: random unit rows for views 1.., the store's rows as view 0, real boxes."""
    base = np.asarray(store.split("train").image_emb, np.float32)
    rng = np.random.default_rng(seed)
    other = rng.normal(size=(count - 1, *base.shape))
    other /= np.linalg.norm(other, axis=-1, keepdims=True)
    emb = np.concatenate([base[None], other]).astype(np.float16)
    return ViewTargets(emb, view_boxes(ViewsConfig(count=count, seed=seed), range(len(base))), {"seed": seed})


def test_the_loader_gives_each_image_its_views_box_and_teacher_row(work):
    root, index, store, cache = work
    views = fake_views(store)
    train = store.split("train")
    text_image = np.asarray(train.text_image)
    bank = TeacherBank(train.image_emb, train.text_emb, text_image, torch.device("cpu"))
    model = build_student(tiny_cfg(root).student, store.dim)
    sampler = EpochSampler(len(text_image), 4, seed=0)
    pool = train.unpaired_image
    unpaired = Unpaired(images=UnpairedSampler(len(pool), 3, 0, sampler.steps_per_epoch, stream=1), image_rows=pool)
    choice = ViewChoice(views, seed=7, device=torch.device("cpu"))
    loader = BatchLoader(
        cache.split("train"), bank, tokenize_all(model.tokenize, ["x"] * len(text_image)), sampler,
        queue_size=0, use_queue=True, num_workers=0, unpaired=unpaired, views=choice,
    )  # fmt: skip
    for epoch, step in ((0, 0), (1, 2)):
        hb = loader.host_batch(epoch, step)
        b = loader.to_device(hb)
        img_rows = text_image[hb.rows]
        v = view_of(7, epoch, img_rows, 3)
        assert torch.equal(b.image_boxes, torch.from_numpy(views.boxes[img_rows, v]))
        assert torch.equal(b.t_v, torch.from_numpy(views.emb[v, img_rows]))
        u_rows = hb.u_image_rows
        assert torch.equal(b.unpaired.t_v, torch.from_numpy(views.emb[view_of(7, epoch, u_rows, 3), u_rows]))
        assert torch.equal(b.u_image_boxes, torch.from_numpy(views.boxes[u_rows, view_of(7, epoch, u_rows, 3)]))
        assert torch.equal(b.queue_v, bank.image)  # the negatives stay the teacher's view-0 rows


def test_kill_and_resume_with_views_is_bitwise_exact_and_the_views_are_read(work):
    root, index, store, cache = work
    cfg = tiny_cfg(root, epochs=2, checkpoint_every_steps=3, unpaired_images_per_step=2, teacher_views=True)
    cfg = replace(cfg, keep_checkpoints=True)

    def go(out, c, views, **kw):
        return run_distill(
            c, index=index, store=store, cache=cache, out_dir=root / out, ckpt_dir=root / "ckpt" / out,
            views=views, **kw,
        )  # fmt: skip

    views = fake_views(store)
    full = go("v_full", cfg, views)
    assert not go("v_killed", cfg, views, stop_after_steps=5).completed
    assert go("v_killed", replace(cfg, num_workers=2), views).global_step == full.global_step
    a, b = (torch.load(root / f"ckpt/v_{n}/last.pt") for n in ("full", "killed"))
    for k, t in a["model"].items():
        assert torch.equal(t, b["model"][k]), k
    assert (root / "v_full/train_log.csv").read_text() == (root / "v_killed/train_log.csv").read_text()
    # other views' rows (same boxes), or no views at all: another student
    go("v_other", cfg, replace(views, emb=fake_views(store, seed=1).emb))
    go("v_none", replace(cfg, teacher_views=False), None)
    for other in ("v_other", "v_none"):
        c = torch.load(root / f"ckpt/{other}/last.pt")
        assert not all(torch.equal(t, c["model"][k]) for k, t in a["model"].items()), other


def test_views_settings_that_cannot_work_are_one_line(work):
    root, index, store, cache = work
    with pytest.raises(ConfigError, match="teacher_views and augment.enabled exclude each other"):
        tiny_cfg(root, teacher_views=True, augment={"enabled": True})
    with pytest.raises(ConfigError, match="teacher_views has the main teacher's views only"):
        tiny_cfg(root, teacher_views=True, loss={"response": 1.0, "teachers": ["second"]})
    with pytest.raises(InputError, match="no views store was given; run `kdpipe views`"):
        run_distill(
            tiny_cfg(root, epochs=1, teacher_views=True), index=index, store=store, cache=cache,
            out_dir=root / "v_missing", ckpt_dir=root / "ckpt" / "v_missing",
        )  # fmt: skip
