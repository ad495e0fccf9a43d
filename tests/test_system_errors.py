"""Environment errors in one line (issue 13, item 3): disk full, read-only or forbidden paths and out of
memory are mapped in one place, name the path and what to do, exit 2, and leave no temp file behind;
a params file that is not UTF-8 is one line too."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from extract_helpers import TinyTeacher, make_dataset
from typer.testing import CliRunner

from pipeline.store.durable import atomic_dir, atomic_path
from pipeline.store.ownership import Output
from pipeline.system_errors import environment_error

_MESSAGES = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}


@pytest.mark.parametrize("code", sorted(_MESSAGES))
def test_machine_errors_become_one_line_naming_the_path(code):
    problem = environment_error(OSError(code, os.strerror(code), "/data/out/features.zarr"))
    text = str(problem)
    assert text.startswith(f"/data/out/features.zarr: {_MESSAGES[code]}; ") and "\n" not in text
    assert "completed outputs are untouched" in text


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.EISDIR, "is a directory, where a file is expected; give the path of a file"),
        (errno.ENOTDIR, "a file stands where this path needs a directory; choose another path"),
        (errno.EEXIST, "already exists, and is not what kdpipe creates there"),
        (errno.ENAMETOOLONG, "file name too long; choose a shorter path"),
    ],
)
def test_a_path_of_the_wrong_kind_met_by_any_write_is_one_line_naming_it(code, words):
    """The backstop where no writer's claim looked first (a directory where a file is written, a file inside a
    path that needs a directory): the machine's errno becomes one line naming the path."""
    problem = environment_error(OSError(code, os.strerror(code), "/data/out/metrics.json"))
    assert problem is not None and str(problem).startswith(f"/data/out/metrics.json: {words}"), problem
    assert "\n" not in str(problem)


def test_memory_errors_and_bugs():
    assert "out of memory (host RAM)" in str(environment_error(MemoryError()))
    if hasattr(torch.cuda, "OutOfMemoryError"):
        assert "out of GPU memory" in str(environment_error(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    # not the machine's fault: a bug or an input error keeps its own handling
    assert environment_error(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert environment_error(RuntimeError("shape mismatch")) is None


def test_a_failed_write_removes_its_temp_file_and_names_the_target(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous complete checkpoint")
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # what a failed write() raises: no file name
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert target.read_bytes() == b"the previous complete checkpoint"
    # the same for a directory written whole, and for torch's C++ writer (RuntimeError over the OSError)
    plots = tmp_path / "plots"
    with pytest.raises(OSError) as info:
        with atomic_dir(plots, Output("a test's plots", directory=True, names=frozenset({"a.png"}))) as tmp:
            (tmp / "a.png").write_bytes(b"half")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(plots)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_bug_inside_a_write_keeps_its_own_exception(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_bytes(b"half")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise KeyError("a bug while handling it")  # noqa: B904 -- the context chain is the point
    with pytest.raises(FileNotFoundError) as info:  # a named OSError keeps its name and its type
        with atomic_path(tmp_path / "y"):
            open(tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


class _FullDisk(io.FileIO):
    """A file whose writes fail with `code` once `room` bytes are written (a patched writer: no tmpfs needed)."""

    room = 0
    code = errno.ENOSPC

    def write(self, data):
        if len(data) > type(self).room:
            raise OSError(type(self).code, os.strerror(type(self).code))
        type(self).room -= len(data)
        return super().write(data)


def _full_open(code: int, room: int):
    _FullDisk.room, _FullDisk.code = room, code

    def fake_open(path, mode="r", *args, **kwargs):
        return _FullDisk(path, mode.replace("b", "").replace("+", "") or "r") if "w" in mode else open(path, mode)

    return fake_open


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    """Before, torch.save(path) reported a full disk as RuntimeError 'unexpected pos' and left last.pt.tmp."""
    from pipeline.distill import checkpoints
    from pipeline.distill.checkpoints import TrainState, save_checkpoint

    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class Balancer:
        def state_dict(self):
            return {}

    kw = dict(
        model=model, optimizer=opt, scheduler=sched, balancer=Balancer(), state=TrainState(), cfg_dict={}, meta={}
    )
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, **kw)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoints, "open", _full_open(errno.ENOSPC, room=4096), raising=False)
    model.weight.data += 1
    with pytest.raises(OSError) as info:
        save_checkpoint(path, **kw)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)  # not "unexpected pos"
    assert os.listdir(path.parent) == ["last.pt"] and path.read_bytes() == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_extract_command_on_a_full_or_read_only_disk_is_one_line_exit_2_no_temp_files(tmp_path, monkeypatch, code):
    import pipeline.extract.run as extract
    from stages.cli import app

    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    index = make_dataset(tmp_path / "data")
    index.save(tmp_path / "data" / "index")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"workdir": str(tmp_path / "work"), "extract": {"num_workers": 0, "chunk_rows": 8}})
    )
    monkeypatch.setattr(extract, "build_teacher", lambda cfg, device, dtype: TinyTeacher())
    # the store's metadata and the first chunks fit; a later chunk file does not (zarr writes chunk files)
    _fill_zarr_disk(monkeypatch, code, chunks_that_fit=3)
    r = CliRunner().invoke(app, ["extract", "--params", str(params), "--index", str(tmp_path / "data" / "index")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and _MESSAGES[code] in lines[0], r.output
    store = tmp_path / "work" / "features.zarr"
    assert lines[0].startswith(f"error: {store}/") and "/c/" in lines[0]  # the chunk file that did not fit
    leftovers = [p for p in store.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []
    # what was committed stays: the rerun on a disk with room resumes instead of starting over
    monkeypatch.undo()
    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    monkeypatch.setattr(extract, "build_teacher", lambda cfg, device, dtype: TinyTeacher())
    r = CliRunner().invoke(app, ["extract", "--params", str(params), "--index", str(tmp_path / "data" / "index")])
    assert r.exit_code == 0 and "3 of " in r.output, r.output


def test_a_full_disk_while_the_store_is_set_up_names_the_store(tmp_path, monkeypatch):
    import pipeline.extract.run as extract
    from stages.cli import app

    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    index = make_dataset(tmp_path / "data")
    index.save(tmp_path / "data" / "index")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "extract": {"num_workers": 0}}))
    monkeypatch.setattr(extract, "build_teacher", lambda cfg, device, dtype: TinyTeacher())
    _fill_zarr_disk(monkeypatch, errno.ENOSPC, chunks_that_fit=0, which="/c/")  # the small arrays' chunks
    r = CliRunner().invoke(app, ["extract", "--params", str(params), "--index", str(tmp_path / "data" / "index")])
    store = tmp_path / "work" / "features.zarr"
    assert r.exit_code == 2 and r.output.startswith(f"error: {store}: no space left on the device;"), r.output
    assert len(r.output.strip().splitlines()) == 1


def _fill_zarr_disk(monkeypatch, code: int, chunks_that_fit: int, which: str = "_emb/c/") -> None:
    """zarr's LocalStore writes each file through `_put` (temp file, write, rename): after `chunks_that_fit`
    embedding chunk files, a write fails as write() does on a full or read-only disk (an OSError naming no
    file). A patched writer rather than a small tmpfs: mounting one needs root."""
    from zarr.storage import _local

    put, left = _local._put, [chunks_that_fit]

    def full_put(path: Path, value, exclusive: bool = False):
        if which in str(path):
            if left[0] == 0:
                raise OSError(code, os.strerror(code))
            left[0] -= 1
        return put(path, value, exclusive)

    monkeypatch.setattr(_local, "_put", full_put)


def test_params_file_that_is_not_utf8_is_one_line(tmp_path):
    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_bytes(b"workdir: artifacts/caf\xe9\n")  # Latin-1 e-acute
    for stage in ("fit-teacher", "prepare", "extract", "distill", "evaluate", "export", "report"):
        r = CliRunner().invoke(app, [stage, "--params", str(params)])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0] == f"error: {params}: not UTF-8 text (byte 0xe9 at offset 22); save it as UTF-8"


def test_unreadable_params_file_is_one_line(tmp_path, monkeypatch):
    from stages import _common
    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("workdir: w\n")

    def forbidden(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(_common.Path, "read_text", forbidden)  # root reads any file: a chmod would not do
    r = CliRunner().invoke(app, ["prepare", "--params", str(params)])
    assert r.exit_code == 2 and r.output.strip().startswith(f"error: {params}: permission denied;"), r.output
    assert Path(params).exists()


def test_prepare_on_a_full_disk_names_the_image_cache(tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    import pipeline.data.prepare as prepare
    from stages.cli import app

    (tmp_path / "images").mkdir()
    images = []
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "train", "sentences": [{"raw": f"image {i}"}]})
    (tmp_path / "ann.json").write_text(json.dumps({"dataset": "t", "images": images}))
    dataset = {"name": "t", "format": "karpathy", "annotations": str(tmp_path / "ann.json")}
    params = tmp_path / "params.yaml"
    prepare_section = {"dataset": {**dataset, "image_root": str(tmp_path / "images")}, "workers": 1}
    params.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "prepare": prepare_section}))

    def full(*args, **kwargs):  # the decode task's write into the cache's data file, as on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "write_rows", full)
    r = CliRunner().invoke(app, ["--quiet", "prepare", "--params", str(params)])  # the error line alone
    cache = tmp_path / "work" / "images.zarr"
    assert r.exit_code == 2 and r.output.startswith(f"error: {cache}: no space left on the device;"), r.output
    assert len(r.output.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "work").iterdir() if not p.name.endswith(".kdpipe-lock")] == []


# -- paths of the wrong kind ----------------------------------------------------------------------------------
def test_a_workdir_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    from cli_helpers import one_error_line, run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "params.yaml").write_text("workdir: notes.txt\n")
    for args, line in [
        (("evaluate",), "error: params.yaml: workdir: notes.txt cannot be a directory: a file stands there; "),
        (
            ("index", "--workdir", "notes.txt/sub"),
            "error: --workdir: notes.txt/sub cannot be a directory: a file stands there (in its path, notes.txt); ",
        ),
        (("search", "a dog"), "error: params.yaml: workdir: notes.txt cannot be a directory"),
        (("export", "--workdir", "notes.txt"), "error: --workdir: notes.txt cannot be a directory"),
    ]:
        assert one_error_line(run_cli(*args)).startswith(line), args
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


def test_an_output_file_given_as_a_directory_or_under_a_file_is_one_line(tmp_path, monkeypatch):
    from cli_helpers import one_error_line, run_cli

    from pipeline.store.features_writer import write_store

    monkeypatch.chdir(tmp_path)
    splits = {
        "test": {
            "image_emb": np.eye(2, 4),
            "text_emb": np.eye(2, 4),
            "text_image": np.arange(2, dtype=np.int32),
            "image_id": ["a", "b"],
        }
    }
    write_store(tmp_path / "s.zarr", splits, teacher={"name": "t"}, dataset={"name": "d", "fingerprint": "f" * 64})
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "mine.txt").write_text("kept")
    (tmp_path / "notes.txt").write_text("kept")
    for args, line in [
        # each writer claims its output first (pipeline/store/ownership.py): its own words, one line
        (
            ("evaluate", "--features", "s.zarr", "--out", "outdir"),
            "error: outdir: is a directory, where a metrics file goes; ",
        ),
        (
            ("export-hdf5", "s.zarr", "--out", "outdir"),
            "error: outdir: is a directory, where an HDF5 export of a feature store goes; ",
        ),
        (
            ("evaluate", "--features", "s.zarr", "--out", "notes.txt/m.json"),
            "error: notes.txt: is a file, where the directory of a metrics file (notes.txt/m.json) goes; ",
        ),
    ]:
        assert one_error_line(run_cli(*args)).startswith(line), args
    assert (tmp_path / "outdir" / "mine.txt").read_text() == "kept" and (tmp_path / "notes.txt").read_text() == "kept"
