"""Several teachers in one feature store: each extra teacher is a complete version-1 store of its own under
teachers/<name>/, bitwise what extracting that teacher alone writes; the main store's arrays read as before;
adding or removing a teacher reuses the main rows; a failed run resumes exactly; bad images leave every
teacher's store; each teacher's logit scale is recorded."""

from pathlib import Path

import numpy as np
import pytest
import zarr
from extract_helpers import TinyTeacher, make_dataset, store_files, verified_files
from PIL import Image

from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.store.features import open_store, read_attrs
from pipeline.store.verify import verify_store
from pipeline.teachers import LiTTeacherConfig, TeacherConfig
from pipeline.teachers.fit_teacher import FitTeacherConfig, train_heads
from pipeline.teachers.lit import LiTHeads

BASE = dict(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)
# the extra teachers are built by the tests; the config names them (any kind: it is never built here)
EXTRA = ExtractConfig(**BASE, extra_teachers={"second": TeacherConfig(kind="lit", lit=LiTTeacherConfig())})
MAIN, SECOND = (lambda **kw: TinyTeacher(**kw)), (lambda **kw: TinyTeacher(dim=16, seed=7, scale=33.0, **kw))


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root), root


@pytest.fixture(scope="module")
def alone(dataset, tmp_path_factory):
    """Each teacher extracted alone, into a store of its own: what the multi-teacher store must hold."""
    index, _ = dataset
    base = tmp_path_factory.mktemp("alone")
    run_extract(index, ExtractConfig(**BASE), base / "main.zarr", teacher=MAIN())
    run_extract(index, ExtractConfig(**BASE), base / "second.zarr", teacher=SECOND())
    return base / "main.zarr", base / "second.zarr"


@pytest.fixture(scope="module")
def together(dataset, tmp_path_factory):
    index, _ = dataset
    out = tmp_path_factory.mktemp("both") / "features.zarr"
    run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    return out


def _files(path: Path) -> dict[str, bytes]:
    """store_files without the lock files readers leave beside a store (an extra teacher's: in teachers/)."""
    return {k: v for k, v in store_files(path).items() if not k.endswith(".kdpipe-lock")}


def _without_teachers(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if not k.startswith("teachers/") and k != "zarr.json"}


def test_each_teachers_arrays_read_as_before(together, alone):
    main_alone, second_alone = alone
    # the extra teacher's store is bitwise the store that teacher writes alone
    assert verified_files(together / "teachers" / "second") == verified_files(second_alone)
    # the main store: the same arrays; its attrs add the list of teachers, nothing else
    assert _without_teachers(_files(together)) == _without_teachers(_files(main_alone))
    attrs, before = read_attrs(together), read_attrs(main_alone)
    assert attrs.pop("teachers") == ["second"] and attrs == before
    assert verify_store(together).ok  # kdpipe verify reads every teacher's chunks
    assert verify_store(together).chunks == verify_store(main_alone).chunks + verify_store(second_alone).chunks


def test_it_opens_with_plain_zarr_and_with_open_store(together, dataset):
    index, _ = dataset
    g = zarr.open_group(str(together), mode="r")
    assert g.attrs["complete"] is True and g.attrs["teachers"] == ["second"]
    second = g["teachers/second"]
    assert second.attrs["complete"] is True and second.attrs["dim"] == 16
    assert second.attrs["teacher"]["logit_scale"] == 33.0 and g.attrs["teacher"]["logit_scale"] is None
    view = index.split("train")
    images = [Image.open(p) for p in view.image_path]
    expected = SECOND().encode_images(images).numpy()
    np.testing.assert_allclose(second["train/image_emb"][:].astype(np.float32), expected, atol=1e-3)
    np.testing.assert_array_equal(g["teachers/second/train/text_image"][:], g["train/text_image"][:])

    store = open_store(together, expect_fingerprint=index.fingerprint)
    assert store.extra_teachers == ("second",) and store.dim == 32 and store.logit_scale is None
    other = store.teacher_store("second")
    assert other.dim == 16 and other.logit_scale == 33.0 and other.teacher["seed"] == 7
    np.testing.assert_array_equal(np.asarray(other.split("test").text_emb), g["teachers/second/test/text_emb"][:])
    assert open_store(together / "teachers" / "second").dim == 16  # a store of its own for any v1 reader
    with pytest.raises(InputError, match="no teacher 'third' in this feature store"):
        store.teacher_store("third")


def test_adding_a_teacher_reuses_the_main_rows_and_removing_it_restores_the_main_store(
    dataset, alone, together, tmp_path
):
    index, _ = dataset
    main_alone, _ = alone
    out = tmp_path / "features.zarr"
    first = run_extract(index, ExtractConfig(**BASE), out, teacher=MAIN())
    added = run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    assert added.units_reused == first.units_total and added.units_computed == 0  # the main teacher not rerun
    assert _files(out) == _files(together)
    kept = run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND(fail_after=0)})
    assert kept.units_computed == 0  # nothing changed: the extra store is kept, its teacher never runs
    removed = run_extract(index, ExtractConfig(**BASE), out, teacher=MAIN())
    assert removed.units_computed == 0 and not (out / "teachers").exists()
    assert _files(out) == _files(main_alone)  # byte for byte a single-teacher store again


def test_a_failed_extra_teacher_resumes_to_the_same_store(dataset, together, tmp_path):
    index, _ = dataset
    out = tmp_path / "features.zarr"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND(fail_after=4)})
    assert read_attrs(out)["complete"] is False  # the main store waits for its teachers
    assert read_attrs(out / "teachers" / "second")["complete"] is False
    done = len(list((out / "teachers" / "second" / ".extract" / "done").rglob("*.json")))
    assert done > 0
    result = run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    assert result.units_computed == 0  # the main store's units were all done
    assert _files(out) == _files(together)


def test_a_teacher_added_to_a_complete_store_that_fails_leaves_that_store_whole(dataset, alone, together, tmp_path):
    """The complete store stays in place, byte for byte, while a teacher is added beside it (the rewrite is a
    hard-linked copy, swapped in once every teacher is complete); the rerun finishes it, main rows reused."""
    index, _ = dataset
    main_alone, _ = alone
    out = tmp_path / "features.zarr"
    run_extract(index, ExtractConfig(**BASE), out, teacher=MAIN())
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND(fail_after=4)})
    assert _files(out) == _files(main_alone) and open_store(out).extra_teachers == ()  # readers see the old store
    result = run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    assert result.units_computed == 0  # the main teacher's units: reused, not recomputed
    assert _files(out) == _files(together)


def test_a_changed_extra_teacher_is_recomputed_alone(dataset, together, tmp_path):
    index, _ = dataset
    out = tmp_path / "features.zarr"
    run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": TinyTeacher(dim=16, seed=8)})
    result = run_extract(index, EXTRA, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    assert result.units_computed == 0
    assert _files(out) == _files(together)


def test_bad_images_leave_every_teachers_store(tmp_path):
    root = tmp_path / "data"
    index = make_dataset(root, n_train=10, n_test=4)
    Path(index.image_abspath(3)).write_bytes(b"not an image")
    cfg = ExtractConfig(**{**BASE, "on_bad_image": "skip"}, extra_teachers=EXTRA.extra_teachers)
    out = tmp_path / "features.zarr"
    run_extract(index, cfg, out, teacher=MAIN(), extra_teachers={"second": SECOND()})
    store = open_store(out)
    other = store.teacher_store("second")  # checked: the same rows
    assert store.split("train").n_images == other.split("train").n_images == 9
    assert [s["index_row"] for s in store.skipped_images] == [s["index_row"] for s in other.skipped_images] == [3]


def test_a_teacher_store_of_other_rows_is_refused(together, tmp_path):
    import shutil

    copy = tmp_path / "features.zarr"
    shutil.copytree(together, copy)
    arr = zarr.open_array(str(copy / "teachers" / "second" / "train" / "text_image"), mode="r+")
    arr[:] = arr[:][::-1].copy()
    with pytest.raises(InputError, match="does not hold the main store's rows"):
        open_store(copy).teacher_store("second")


def test_teacher_names_are_checked():
    for bad in ("a/b", "", "1st", "..", "x" * 65):
        with pytest.raises(ValueError, match="not a usable teacher name"):
            ExtractConfig(extra_teachers={bad: TeacherConfig()})


def test_a_lit_teachers_logit_scale_is_one_over_its_fit_temperature(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 1280, generator=g), torch.randn(8, 384, generator=g)
    cfg = FitTeacherConfig(dim=4, epochs=1, batch_size=4, temperature=0.04)
    heads, _ = train_heads(img, txt, np.arange(8), np.arange(8), cfg, variant="lite2", image_size=64)
    assert heads.logit_scale == pytest.approx(25.0)
    heads.save(tmp_path / "heads.safetensors", extra={"config": {"temperature": 0.04}})
    assert LiTHeads.load(tmp_path / "heads.safetensors").logit_scale == pytest.approx(25.0)
    heads.save(tmp_path / "old.safetensors", extra={})  # a heads file without its fit record: unknown
    assert LiTHeads.load(tmp_path / "old.safetensors").logit_scale is None
