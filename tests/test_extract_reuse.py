"""Rows an extract run copies from a complete store instead of computing them (pipeline/extract/reuse.py): all of
them from a store of the same teacher, dataset and files (bit for bit what computing gives, the extra teachers
computed beside them), the captions only for a teacher seen through a view, and none from another teacher's
store."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from extract_helpers import TinyTeacher, make_dataset, store_files

from pipeline.data.file_hashes import sha256_file
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.store.features import open_store
from pipeline.teachers import LiTTeacherConfig, TeacherConfig

BASE = dict(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


class Frozen(TinyTeacher):
    """The same teacher, which must not be asked for anything: every row has to come from the source."""

    def encode_image_batch(self, pixels):
        raise AssertionError("an image row was computed")

    def encode_text_batch(self, tokens):
        raise AssertionError("a caption row was computed")


def _files(path):
    return {k: v for k, v in store_files(path).items() if not k.endswith(".kdpipe-lock")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    index = make_dataset(root)
    # prepare's index records each file's sha256: image rows are copied only where the source's chunk embedded
    # the same files (an index without hashes cannot tell, and its images are computed)
    index = index.with_hashes([sha256_file(index.image_root / p) for p in index.image_path])
    run_extract(index, ExtractConfig(**BASE), root / "main.zarr", teacher=TinyTeacher())
    return index, root


def test_a_store_of_the_same_teacher_gives_every_row_bit_for_bit(data, tmp_path):
    index, root = data
    main = open_store(root / "main.zarr")
    run_extract(index, ExtractConfig(**BASE), tmp_path / "copy.zarr", teacher=Frozen(), source=main)
    assert _files(tmp_path / "copy.zarr") == _files(root / "main.zarr")
    # with another teacher beside it: the main rows copied, the other teacher's computed into teachers/<name>/
    cfg = ExtractConfig(**BASE, extra_teachers={"second": TeacherConfig(kind="lit", lit=LiTTeacherConfig())})
    second = TinyTeacher(dim=16, seed=7)
    run_extract(index, cfg, tmp_path / "two.zarr", teacher=Frozen(), extra_teachers={"second": second}, source=main)
    two = open_store(tmp_path / "two.zarr")
    for s in main.splits:
        assert np.array_equal(np.asarray(two.split(s).image_emb), np.asarray(main.split(s).image_emb))
        assert np.array_equal(np.asarray(two.split(s).text_emb), np.asarray(main.split(s).text_emb))
    assert two.teacher_store("second").dim == 16


def test_without_the_files_hashes_the_images_are_computed_and_the_captions_copied(data, tmp_path):
    index, root = data
    bare = replace(index, image_sha256=None)
    run_extract(bare, ExtractConfig(**BASE), tmp_path / "m.zarr", teacher=TinyTeacher())
    with pytest.raises(AssertionError, match="an image row was computed"):
        run_extract(
            bare, ExtractConfig(**BASE), tmp_path / "c.zarr", teacher=Frozen(), source=open_store(tmp_path / "m.zarr")
        )

    class ImagesOnly(Frozen):
        encode_image_batch = TinyTeacher.encode_image_batch

    run_extract(
        bare, ExtractConfig(**BASE), tmp_path / "c.zarr", teacher=ImagesOnly(), source=open_store(tmp_path / "m.zarr")
    )
    assert _files(tmp_path / "c.zarr") == _files(tmp_path / "m.zarr")


def test_another_teachers_store_gives_nothing(data, tmp_path):
    index, root = data
    run_extract(index, ExtractConfig(**BASE), tmp_path / "own.zarr", teacher=TinyTeacher(seed=3))
    source = open_store(root / "main.zarr")
    run_extract(index, ExtractConfig(**BASE), tmp_path / "x.zarr", teacher=TinyTeacher(seed=3), source=source)
    assert _files(tmp_path / "x.zarr") == _files(tmp_path / "own.zarr")
