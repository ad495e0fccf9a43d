"""HDF5 export/import and the DSMD per-caption import produce valid stores with the right rows."""

import json
import re

import h5py
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.store.features import open_store
from pipeline.store.features_writer import write_store
from pipeline.store.hdf5 import export_hdf5, import_dsmd, import_hdf5
from pipeline.store.verify import verify_store

D = 16


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


def _index(extra_image=False):
    images = [(f"im{i}", f"im{i}.jpg", "train" if i < 6 else "test") for i in range(10)]
    captions = [(f"caption {c} of {i}", i) for i in range(10) for c in range(5 if i % 2 else 4)]
    if extra_image:
        images.append(("lonely", "lonely.jpg", "test"))
    return DatasetIndex.from_lists("toy", "imgs", images, captions)


def _store(path, index, dtype="float16"):
    rng = np.random.default_rng(0)
    splits = {}
    for name in index.splits:
        v = index.split(name)
        splits[name] = {
            "image_emb": rng.standard_normal((v.n_images, D)),
            "text_emb": rng.standard_normal((v.n_captions, D)),
            "text_image": v.text_image,
            "image_id": v.image_id.tolist(),
        }
    write_store(
        path,
        splits,
        teacher={"name": "t", "sha256": "abc"},
        dataset={"name": index.name, "fingerprint": index.fingerprint},
        dtype=dtype,
        chunk_rows=8,
    )
    return open_store(path)


def _same_rows(a, b, exact=True):
    assert a.splits == b.splits
    for name in a.splits:
        x, y = a.split(name), b.split(name)
        for key in ("image_emb", "text_emb", "text_image"):
            assert getattr(x, key).dtype == getattr(y, key).dtype
            if exact or key == "text_image":
                np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
            else:  # normalized once more in float32: equal to an ulp
                np.testing.assert_allclose(getattr(x, key), getattr(y, key), rtol=1e-6, atol=1e-7)
        assert x.image_id.tolist() == y.image_id.tolist()


def test_export_layout_and_attrs_readable_with_h5py(tmp_path):
    index = _index()
    store = _store(tmp_path / "s.zarr", index)
    export_hdf5(tmp_path / "s.zarr", tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert json.loads(f.attrs["kdpipe_attrs"]) == store.attrs
        assert f.attrs["dim"] == D and f.attrs["format"] == "kdpipe-features"
        assert json.loads(f.attrs["teacher"]) == {"name": "t", "sha256": "abc"}
        for name in store.splits:
            sp = store.split(name)
            assert f[f"{name}/image_emb"].dtype == np.float16
            np.testing.assert_array_equal(f[f"{name}/image_emb"][...], sp.image_emb)
            np.testing.assert_array_equal(f[f"{name}/text_emb"][...], sp.text_emb)
            np.testing.assert_array_equal(f[f"{name}/text_image"][...], sp.text_image)
            assert [v.decode() for v in f[f"{name}/image_id"][...]] == sp.image_id.tolist()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_export_import_round_trip_is_bit_exact(tmp_path, dtype):
    index = _index()
    store = _store(tmp_path / "s.zarr", index, dtype=dtype)
    export_hdf5(tmp_path / "s.zarr", tmp_path / "s.h5")
    import_hdf5(tmp_path / "s.h5", tmp_path / "back.zarr", index=index)
    back = open_store(tmp_path / "back.zarr", expect_fingerprint=index.fingerprint)
    _same_rows(store, back)
    assert back.teacher == store.teacher and back.attrs["imported_from"] == {"file": "s.h5", "format": "hdf5"}
    # checksums are recomputed on import (the import chunks rows its own way): they match the new files
    for path in (tmp_path / "back.zarr", tmp_path / "s.zarr"):
        report = verify_store(path)
        assert report.ok and not report.unchecked and report.chunks >= 8
    # converting to the other dtype renormalizes in float32
    other = "float32" if dtype == "float16" else "float16"
    import_hdf5(tmp_path / "s.h5", tmp_path / "other.zarr", dtype=other)
    conv = open_store(tmp_path / "other.zarr").split("train")
    assert conv.image_emb.dtype == np.dtype(other)
    np.testing.assert_allclose(
        conv.image_emb.astype(np.float32), store.split("train").image_emb.astype(np.float32), atol=2e-3
    )


def test_import_checks_the_index_and_foreign_files(tmp_path):
    index = _index()
    _store(tmp_path / "s.zarr", index)
    export_hdf5(tmp_path / "s.zarr", tmp_path / "s.h5")
    other = DatasetIndex.from_lists(
        "toy",
        "imgs",
        [(f"x{i}", f"im{i}.jpg", "train" if i < 6 else "test") for i in range(10)],
        list(zip(index.caption_text, index.caption_image)),
    )
    with pytest.raises(InputError, match="image 0 is 'im0', the index has 'x0'"):
        import_hdf5(tmp_path / "s.h5", tmp_path / "bad.zarr", index=other)

    # a file written by other code: no attrs, no image ids; unnormalized float32 rows
    rng = np.random.default_rng(1)
    v = index.split("test")
    img = rng.standard_normal((v.n_images, D)).astype(np.float32)
    txt = rng.standard_normal((v.n_captions, D)).astype(np.float32)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["test/image_emb"], f["test/text_emb"], f["test/text_image"] = img, txt, v.text_image
    with pytest.raises(InputError, match="no teacher identity"):
        import_hdf5(tmp_path / "foreign.h5", tmp_path / "f.zarr", index=index)
    import_hdf5(tmp_path / "foreign.h5", tmp_path / "f.zarr", index=index, teacher={"name": "elsewhere"})
    sp = open_store(tmp_path / "f.zarr", expect_fingerprint=index.fingerprint).split("test")
    assert sp.image_id.tolist() == v.image_id.tolist() and sp.image_emb.dtype == np.float32
    np.testing.assert_allclose(sp.image_emb, img / np.linalg.norm(img, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        (tmp_path / "junk.h5").write_text("junk")
        import_hdf5(tmp_path / "junk.h5", tmp_path / "j.zarr")


def test_dsmd_per_caption_tensors_are_deduplicated(tmp_path):
    index = _index()
    store = _store(tmp_path / "s.zarr", index, dtype="float32")
    files = {}
    for name in index.splits:
        sp = store.split(name)
        img = torch.from_numpy(np.asarray(sp.image_emb)[sp.text_image])  # each image repeated per caption
        torch.save(img, tmp_path / f"{name}_img.pt")
        np.save(tmp_path / f"{name}_txt.npy", np.asarray(sp.text_emb))
        files[name] = (tmp_path / f"{name}_img.pt", tmp_path / f"{name}_txt.npy")
    import_dsmd(index, files, tmp_path / "d.zarr", teacher={"name": "dsmd"}, dtype="float32")
    _same_rows(store, open_store(tmp_path / "d.zarr", expect_fingerprint=index.fingerprint), exact=False)

    sp = store.split("test")
    tampered = np.asarray(sp.image_emb)[sp.text_image].copy()
    tampered[6, 3] += 0.5  # test captions 4..8 belong to im7 (im6 has 4)
    torch.save(torch.from_numpy(tampered), tmp_path / "t.pt")
    with pytest.raises(InputError, match="row 6 .*'im7'.* differs from row 4"):
        import_dsmd(index, {"test": (tmp_path / "t.pt", files["test"][1])}, tmp_path / "x.zarr")
    torch.save(torch.from_numpy(tampered[:-1]), tmp_path / "short.pt")
    with pytest.raises(InputError, match="has 18 captions"):
        import_dsmd(index, {"test": (tmp_path / "short.pt", files["test"][1])}, tmp_path / "x.zarr")
    torch.save({"feats": torch.zeros(3)}, tmp_path / "dict.pt")
    with pytest.raises(InputError, match="expected one tensor"):
        import_dsmd(index, {"test": (tmp_path / "dict.pt", files["test"][1])}, tmp_path / "x.zarr")
    lonely = _index(extra_image=True)
    with pytest.raises(InputError, match="'lonely' has no caption"):
        import_dsmd(lonely, {"test": files["test"]}, tmp_path / "x.zarr")


def test_cli_tools_and_exit_code_2(tmp_path):
    from stages import features

    app = typer.Typer()
    app.command("export-hdf5")(features.export_hdf5)
    app.command("import-dsmd")(features.import_dsmd)
    runner = CliRunner()
    r = runner.invoke(app, ["export-hdf5", str(tmp_path / "nothing.zarr"), "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "no feature store here" in r.output and len(r.output.strip().splitlines()) == 1

    index = _index()
    index.save(tmp_path / "index")
    store = _store(tmp_path / "s.zarr", index)
    sp = store.split("test")
    torch.save(torch.from_numpy(np.asarray(sp.image_emb, dtype=np.float32)[sp.text_image]), tmp_path / "i.pt")
    torch.save(torch.from_numpy(np.asarray(sp.text_emb, dtype=np.float32)), tmp_path / "t.pt")
    r = runner.invoke(
        app,
        [
            "import-dsmd",
            "--index",
            str(tmp_path / "index"),
            "--out",
            str(tmp_path / "d.zarr"),
            "--images",
            f"test={tmp_path / 'i.pt'}",
            "--texts",
            f"test={tmp_path / 't.pt'}",
        ],
    )
    assert r.exit_code == 0, r.output
    got = open_store(tmp_path / "d.zarr").split("test")
    np.testing.assert_array_equal(got.image_emb, sp.image_emb)
    r = runner.invoke(
        app,
        [
            "import-dsmd",
            "--index",
            str(tmp_path / "index"),
            "--out",
            str(tmp_path / "e.zarr"),
            "--images",
            f"test={tmp_path / 'i.pt'}",
            "--texts",
            f"val={tmp_path / 't.pt'}",
        ],
    )
    assert r.exit_code == 2 and "--images names splits" in r.output


def test_unpaired_texts_round_trip_through_hdf5(tmp_path):
    images = [(f"im{i}", f"im{i}.jpg", "train") for i in range(4)]
    index = DatasetIndex.from_lists(
        "toy", "imgs", images, [("a", 0), ("b", 1)], unpaired_texts=[("no image", "train"), ("none", "train")]
    )
    rng = np.random.default_rng(3)
    v = index.split("train")
    split = {"image_emb": rng.standard_normal((4, D)), "text_emb": rng.standard_normal((2, D)),
             "text_image": v.text_image, "image_id": v.image_id.tolist(),
             "unpaired_text_emb": rng.standard_normal((2, D))}  # fmt: skip
    write_store(
        tmp_path / "s.zarr", {"train": split}, teacher={"name": "t"}, dataset={"fingerprint": index.fingerprint}
    )
    export_hdf5(tmp_path / "s.zarr", tmp_path / "s.h5")
    import_hdf5(tmp_path / "s.h5", tmp_path / "back.zarr", index=index)
    a, b = open_store(tmp_path / "s.zarr").split("train"), open_store(tmp_path / "back.zarr").split("train")
    np.testing.assert_array_equal(a.unpaired_text_emb, b.unpaired_text_emb)
    assert b.unpaired_image.tolist() == [2, 3]
    other = DatasetIndex.from_lists("toy", "imgs", images, [("a", 0), ("b", 1)], unpaired_texts=[("x", "train")])
    with pytest.raises(InputError, match="unpaired_text_emb has 2 rows, the index 1 texts without an image"):
        import_hdf5(tmp_path / "s.h5", tmp_path / "bad.zarr", index=other)


class _RunsCode:
    """A pickle that would call os.system when unpickled without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_import_dsmd_refuses_a_file_that_is_no_plain_tensor_in_one_line_of_its_own(tmp_path):
    """An unsafe pickle is named by what it asked for, never with torch's advice to retry with
    weights_only=False (which would run it); an .npy of Python objects and bytes that are no pickle alike."""
    from cli_helpers import one_error_line, run_cli

    index = _index()
    index.save(tmp_path / "index")
    sp = _store(tmp_path / "s.zarr", index).split("test")
    torch.save(torch.from_numpy(np.asarray(sp.text_emb, dtype=np.float32)), tmp_path / "t.pt")
    torch.save({"features": _RunsCode()}, tmp_path / "evil.pt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "junk.pt").write_bytes(b"no pickle at all")
    todo = "save the features as one tensor (torch.save) or as .npy"
    for name, line in [
        (
            "evil.pt",
            r"holds Python objects other than tensors \(.*GLOBAL posix\.system.*\); kdpipe reads image "
            r"features as weights only and never runs code from a file; ",
        ),
        ("objects.npy", r"cannot be read as image features \(\.npy, no pickled objects\) \(ValueError: Object arrays"),
        ("junk.pt", r"cannot be read as image features \((no torch\.save file of tensors|\w+): .*\); "),
    ]:
        args = ("import-dsmd", "--index", tmp_path / "index", "--out", tmp_path / "d.zarr")
        error = one_error_line(
            run_cli(*args, "--images", f"test={tmp_path / name}", "--texts", f"test={tmp_path / 't.pt'}")
        )
        assert re.fullmatch(rf"error: {tmp_path / name}: {line}.*", error) and error.endswith(todo), error
        assert "weights_only" not in error and "\\x0a" not in error  # our line, not torch's three paragraphs
    assert not (tmp_path / "d.zarr").exists()


# -- the input is checked whole before anything is written, and a failed import keeps the store it would replace
def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _names(directory):
    """What is in `directory`, but the lock files kdpipe keeps beside its outputs."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".kdpipe-lock"))


def _edit(h5, fn):
    with h5py.File(h5, "r+") as f:
        fn(f)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["test/text_emb"].__setitem__(3, np.nan), "test/text_emb row 3 is not finite (NaN or inf)"),
        (lambda f: f["train/image_emb"].__setitem__(5, np.inf), "train/image_emb row 5 is not finite"),
        (lambda f: f["test/image_emb"].__setitem__(2, 0.0), "test/image_emb row 2 is all zeros"),
        # a file that says its rows are unit length, with one of norm 4 (a rescaled row)
        (
            lambda f: f["test/text_emb"].__setitem__(7, 4 * f["test/text_emb"][7]),
            "test/text_emb row 7 has L2 norm 3.99",
        ),
        # attributes against the arrays: the root copy, and the exact copy inside kdpipe_attrs
        (
            lambda f: f.attrs.__setitem__("dtype", "float32"),
            "attribute dtype says float32 but /train/image_emb is float16",
        ),
        (lambda f: f.attrs.__setitem__("dim", 8), f"attribute dim says 8 but /train/image_emb has {D} columns"),
        (
            lambda f: f.attrs.__setitem__("kdpipe_attrs", f.attrs["kdpipe_attrs"].replace('"float16"', '"float32"')),
            "attribute kdpipe_attrs.dtype says float32 but /train/image_emb is float16",
        ),
    ],
)
def test_a_bad_input_is_refused_naming_the_file_dataset_and_row_and_the_old_store_survives(tmp_path, edit, message):
    index = _index()
    _store(tmp_path / "s.zarr", index)
    export_hdf5(tmp_path / "s.zarr", tmp_path / "in.h5")
    _edit(tmp_path / "in.h5", edit)
    out = tmp_path / "out.zarr"
    _store(out, index)  # a complete store where the import goes
    before = _tree(out)
    with pytest.raises(InputError) as err:
        import_hdf5(tmp_path / "in.h5", out, index=index)
    assert str(err.value).startswith(f"{tmp_path / 'in.h5'}: ") and message in str(err.value)
    assert "teacher produced" not in str(err.value) and str(out) not in str(err.value)
    assert _tree(out) == before and _names(tmp_path) == ["in.h5", "out.zarr", "s.zarr"]
    # converting to another dtype renormalizes rows, but a row that is not what the file says is refused all the same
    if "norm" in message:
        with pytest.raises(InputError, match="has L2 norm 3.99"):
            import_hdf5(tmp_path / "in.h5", out, dtype="float32")


def test_a_failure_while_writing_keeps_the_complete_store_it_would_replace(tmp_path, monkeypatch):
    """The disk fills while the new store is written: the old store is still complete and whole."""
    import errno

    from pipeline.store import features_writer as features

    index = _index()
    _store(tmp_path / "s.zarr", index)
    export_hdf5(tmp_path / "s.zarr", tmp_path / "in.h5")
    _store(tmp_path / "out.zarr", index, dtype="float32")
    before = _tree(tmp_path / "out.zarr")
    real, calls = features.StoreWriter.write_chunk, []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(features.StoreWriter, "write_chunk", full_disk)
    with pytest.raises(OSError) as err:
        import_hdf5(tmp_path / "in.h5", tmp_path / "out.zarr")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "out.zarr")
    assert _tree(tmp_path / "out.zarr") == before and open_store(tmp_path / "out.zarr").attrs["complete"] is True
    assert _names(tmp_path) == ["in.h5", "out.zarr", "s.zarr"]


def test_dsmd_tensors_with_a_non_finite_row_are_named_with_the_row(tmp_path):
    index = _index()
    sp = _store(tmp_path / "s.zarr", index).split("test")
    texts = np.asarray(sp.text_emb, np.float32)
    texts[4, 1] = np.nan
    np.save(tmp_path / "t.npy", texts)
    np.save(tmp_path / "i.npy", np.asarray(sp.image_emb, np.float32)[sp.text_image])
    with pytest.raises(InputError, match=r"t\.npy: text features row 4 is not finite"):
        import_dsmd(index, {"test": (tmp_path / "i.npy", tmp_path / "t.npy")}, tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()
