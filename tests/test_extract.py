"""The extract stage: features equal the teacher's, kill-and-resume is bitwise exact, a changed teacher,
index or setting never mixes rows, torchrun ranks give the same store, bad images follow the policy."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from extract_helpers import TinyTeacher, make_dataset, store_files, verified_files
from PIL import Image
from torchrun_helpers import run_ranks
from typer.testing import CliRunner

from pipeline.config import from_dict
from pipeline.data.index import DatasetIndex
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.store.features import open_store, read_attrs
from pipeline.teachers.base import teacher_record

TESTS = Path(__file__).parent
REPO = TESTS.parent
# Small chunks so that every split has several units; batches that do not divide the chunks.
CFG = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    # fsync only guards against OS crashes; a killed process resumes exactly without it (the SIGKILL test's
    # subprocess keeps it on). Skipping it keeps these many small runs fast on a busy disk.
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    index = make_dataset(root)
    index.save(root / "index")
    return index, root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted single-process run: the store every other run must reproduce bit for bit."""
    index, _ = dataset
    out = tmp_path_factory.mktemp("ref") / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    return out


def test_features_are_the_teachers_in_index_order(dataset, reference):
    index, _ = dataset
    store = open_store(reference, expect_fingerprint=index.fingerprint, expect_dim=32)
    teacher = TinyTeacher()
    assert store.teacher == {**teacher.identity(), "logit_scale": None}  # TinyTeacher has no logit scale
    assert store.dataset == {"name": index.name, "fingerprint": index.fingerprint}
    assert store.attrs["extract"] == {
        "compute_dtype": "float32",
        "device_type": "cpu",
        "chunk_rows": 8,
        "jpeg_draft": False,
    }
    assert store.attrs["skipped_images"] == [] and store.splits == ("train", "test")
    assert not (reference / ".extract").exists()  # progress records are gone from a finished store
    for name in index.splits:
        view, sp = index.split(name), store.split(name)
        assert sp.image_emb.dtype == np.float16
        images = [Image.open(p) for p in view.image_path]
        np.testing.assert_allclose(sp.image_emb.astype(np.float32), teacher.encode_images(images).numpy(), atol=1e-3)
        # captions were bucketed by length for the teacher; here they come back in index order
        np.testing.assert_allclose(
            sp.text_emb.astype(np.float32), teacher.encode_texts(view.caption_text.tolist()).numpy(), atol=1e-3
        )
        np.testing.assert_array_equal(sp.text_image, view.text_image)
        assert sp.image_id.tolist() == view.image_id.tolist()


def test_loader_workers_and_fp32_store(dataset, reference, tmp_path):
    index, _ = dataset
    cfg = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=2)
    run_extract(index, cfg, tmp_path / "w.zarr", teacher=TinyTeacher())
    assert store_files(tmp_path / "w.zarr") == store_files(reference)
    run_extract(
        index,
        ExtractConfig(chunk_rows=8, store_dtype="float32", num_workers=0),
        tmp_path / "f32.zarr",
        teacher=TinyTeacher(),
    )
    sp = open_store(tmp_path / "f32.zarr").split("test")
    assert sp.text_emb.dtype == np.float32
    ref = TinyTeacher().encode_texts(index.split("test").caption_text.tolist()).numpy()
    np.testing.assert_allclose(sp.text_emb, ref, atol=1e-6)


def _script(tmp_path, body):
    path = tmp_path / "run.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(body))
    return path


def _env(fsync=True):
    return dict(
        os.environ, KDPIPE_PROGRESS="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", KDPIPE_FSYNC="1" if fsync else "0"
    )


def test_sigkill_then_resume_is_bitwise_identical(dataset, reference, tmp_path):
    index, root = dataset
    out = tmp_path / "features.zarr"
    script = _script(
        tmp_path,
        """
        from extract_helpers import TinyTeacher
        from pipeline.data.index import DatasetIndex
        from pipeline.extract.config import ExtractConfig
        from pipeline.extract.run import run_extract
        cfg = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)
        run_extract(DatasetIndex.load(sys.argv[1]), cfg, sys.argv[2], teacher=TinyTeacher(delay=0.15))
    """,
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root / "index"), str(out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    done_dir = out / ".extract" / "done"
    deadline = time.monotonic() + 60
    try:
        while len(list(done_dir.rglob("*.json"))) < 3:  # kill once a few chunks are committed, mid-chunk
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the extraction did not start"
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = len(list(done_dir.rglob("*.json")))
    assert read_attrs(out)["complete"] is False
    result = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert result.units_reused == committed and result.units_computed == result.units_total - committed
    assert 3 <= committed < result.units_total
    assert verified_files(out) == store_files(reference)


def _partial(index, out, fail_after=6, cfg=CFG):
    """A store left half-done by a run that failed after `fail_after` batches."""
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(index, cfg, out, teacher=TinyTeacher(fail_after=fail_after))
    assert read_attrs(out)["complete"] is False
    n = len(list((out / ".extract" / "done").rglob("*.json")))
    assert n > 0
    return n


def test_resume_redoes_half_written_chunks_and_removes_stray_files(dataset, reference, tmp_path):
    index, _ = dataset
    out = tmp_path / "features.zarr"
    committed = _partial(index, out)
    # a killed writer's leftovers: a temp file, and a chunk whose data landed but whose marker did not
    (out / "train/image_emb/c/0/0.999.partial").write_bytes(b"junk")
    assert not (out / ".extract/done/train/image_emb.2.json").exists()
    (out / "train/image_emb/c/2").mkdir(parents=True, exist_ok=True)
    (out / "train/image_emb/c/2/0").write_bytes(b"\x7f" * (8 * 32 * 2))
    result = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert result.units_reused == committed
    assert verified_files(out) == store_files(reference)


def test_a_run_resumed_from_markers_without_checksums_records_them_all(dataset, reference, tmp_path):
    """A partial store of a kdpipe that did not yet put checksums in its markers: rank 0 hashes those chunks."""
    index, _ = dataset
    out = tmp_path / "features.zarr"
    committed = _partial(index, out)
    for marker in (out / ".extract" / "done").rglob("*.json"):
        record = json.loads(marker.read_text())
        assert len(record.pop("sha256")) == 64
        marker.write_text(json.dumps(record))
    assert run_extract(index, CFG, out, teacher=TinyTeacher()).units_reused == committed
    assert verified_files(out) == store_files(reference)


@pytest.mark.parametrize(
    "change, expected",
    [
        ("teacher", "different teacher"),
        ("dataset", "different dataset index"),
        ("store_dtype", "different store_dtype"),
        ("chunk_rows", "different extract setting (chunk_rows)"),
        ("compute_dtype", "different extract setting (compute_dtype)"),
        ("nothing", None),
    ],
)
def test_a_changed_run_starts_over_instead_of_mixing_rows(dataset, tmp_path, capsys, caplog, change, expected):
    caplog.set_level("INFO", logger="pipeline")  # the stage's status lines are log records
    index, _ = dataset
    out = tmp_path / "features.zarr"
    committed = _partial(index, out)
    capsys.readouterr()
    teacher, cfg, new_index = TinyTeacher(), CFG, index
    if change == "teacher":
        teacher = TinyTeacher(seed=1)
    elif change == "dataset":
        texts = index.caption_text.copy()
        texts[0] = texts[0] + " (edited)"
        new_index = DatasetIndex(
            index.name,
            index.image_root,
            index.image_id,
            index.image_path,
            index.image_split,
            texts,
            index.caption_image,
        )
    elif change == "store_dtype":
        cfg = ExtractConfig(chunk_rows=8, num_workers=0, store_dtype="float32")
    elif change == "chunk_rows":
        cfg = ExtractConfig(chunk_rows=16, num_workers=0)
    elif change == "compute_dtype":
        cfg = ExtractConfig(chunk_rows=8, num_workers=0, compute_dtype="bfloat16")
    result = run_extract(new_index, cfg, out, teacher=teacher)
    err = capsys.readouterr().err + caplog.text
    if expected is None:
        assert result.units_reused == committed and result.restart_reason is None
        assert "resuming an interrupted extraction" in err
        return
    assert result.units_reused == 0 and expected in result.restart_reason
    line = next(line for line in err.splitlines() if "starting over" in line)
    assert expected in line
    fresh = tmp_path / "fresh.zarr"
    run_extract(new_index, cfg, fresh, teacher=teacher)
    assert store_files(out) == store_files(fresh)  # no row of the earlier run survived


def test_a_complete_store_is_rewritten_and_fresh_forces_a_restart(dataset, reference, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="pipeline")
    index, _ = dataset
    out = tmp_path / "features.zarr"
    _partial(index, out)
    result = run_extract(index, CFG, out, teacher=TinyTeacher(), fresh=True)
    assert result.units_reused == 0 and "--fresh" in result.restart_reason
    capsys.readouterr()
    result = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert result.units_reused == 0 and "rewriting the complete store" in capsys.readouterr().err + caplog.text
    assert verified_files(out) == store_files(reference)


# -- a complete store stays whole until its rewrite is complete ------------------------------------------------
def _kept(tmp_path, out, before):
    """The complete store at `out` is exactly as it was, and readable; nothing else of kdpipe's is left around."""
    assert store_files(out) == before and open_store(out).attrs["complete"] is True
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".kdpipe-lock"))


def test_a_failed_rewrite_keeps_the_complete_store_and_the_rerun_resumes_the_rewrite(dataset, reference, tmp_path):
    index, _ = dataset
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher(seed=1))  # a complete store of another teacher
    before = store_files(out)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(index, CFG, out, teacher=TinyTeacher(fail_after=6))
    assert _kept(tmp_path, out, before) == [".features.zarr.next", "features.zarr"]  # the rewrite, beside it
    again = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert 0 < again.units_reused < again.units_total  # resumed, not started over
    assert verified_files(out) == store_files(reference)
    assert _kept(tmp_path, out, store_files(reference)) == ["features.zarr"]


def test_a_full_disk_during_a_rewrite_keeps_the_complete_store(dataset, tmp_path, monkeypatch):
    """What the one-line error then says, "completed outputs are untouched", is true."""
    import errno

    from pipeline.store import features_writer
    from pipeline.system_errors import environment_error

    index, _ = dataset
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher(seed=1))
    before = store_files(out)
    real, calls = features_writer.StoreWriter.write_chunk, []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(features_writer.StoreWriter, "write_chunk", full_disk)
    with pytest.raises(OSError) as err:
        run_extract(index, CFG, out, teacher=TinyTeacher())
    assert "completed outputs are untouched" in str(environment_error(err.value))
    _kept(tmp_path, out, before)


def test_a_rewrite_on_a_disk_without_room_for_two_stores_is_refused_first(dataset, tmp_path, monkeypatch):
    import collections

    from pipeline.extract import resume

    index, _ = dataset
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher(seed=1))
    before = store_files(out)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(resume.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(InputError) as err:
        run_extract(index, CFG, out, teacher=TinyTeacher())
    message = str(err.value)
    need = re.match(
        rf"{re.escape(str(out))}: rewriting this complete store needs about ([0-9.]+) MB free beside it", message
    )
    # at least the store's own size (another such store must fit), at most that plus the allowance for metadata
    size = sum(len(b) for b in before.values())
    assert need and size <= float(need[1]) * 1e6 + 5e4 <= size + 1.2e6, (message, size)
    assert "0.0 MB are free; free space, or delete the old store" in message
    assert _kept(tmp_path, out, before) == ["features.zarr"]


def test_a_kill_after_the_rewrite_completed_but_before_the_swap_is_finished_by_the_rerun(
    dataset, reference, tmp_path, monkeypatch
):
    from pipeline.extract import run as extract_run

    index, _ = dataset
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher(seed=1))
    before = store_files(out)

    def killed(out, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_run, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        run_extract(index, CFG, out, teacher=TinyTeacher())
    _kept(tmp_path, out, before)
    monkeypatch.undo()
    again = run_extract(index, CFG, out, teacher=TinyTeacher())
    assert again.units_computed == 0
    assert verified_files(out) == store_files(reference)
    assert _kept(tmp_path, out, store_files(reference)) == ["features.zarr"]


def test_two_torchrun_ranks_write_the_same_store_as_one_process(dataset, reference, tmp_path):
    index, root = dataset
    out = tmp_path / "features.zarr"
    script = _script(
        tmp_path,
        """
        import json, os
        from extract_helpers import TinyTeacher
        from pipeline.data.index import DatasetIndex
        from pipeline.extract.config import ExtractConfig
        from pipeline.extract.run import run_extract
        cfg = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)
        r = run_extract(DatasetIndex.load(sys.argv[1]), cfg, sys.argv[2], teacher=TinyTeacher())
        with open(f"{sys.argv[3]}/rank{os.environ['RANK']}.json", "w") as f:
            json.dump({"rank": int(os.environ["RANK"]), "computed": r.units_computed, "total": r.units_total}, f)
    """,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    for _ in ("a new store", "the rewrite of a complete one, beside it"):
        code, output = run_ranks([*command, str(root / "index"), str(out), str(tmp_path)], env=_env(fsync=False))
        assert code == 0, output
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert sorted(r["rank"] for r in results) == [0, 1]
        assert all(r["computed"] > 0 for r in results)  # both ranks did work...
        assert sum(r["computed"] for r in results) == results[0]["total"]  # ...and each unit was done once
        assert verified_files(out) == store_files(reference)
    assert not (tmp_path / ".features.zarr.next").exists()


def _corrupt(root, index):
    view = index.split("train")
    bad = Path(view.image_path[20])  # in the third chunk of train: two chunks are committed before it
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated JPEG or PNG
    return bad


def test_bad_image_error_names_the_file_then_skip_resumes_and_drops_it(tmp_path):
    index = make_dataset(tmp_path / "data")
    bad = _corrupt(tmp_path / "data", index)
    out = tmp_path / "features.zarr"
    with pytest.raises(InputError, match=f"{bad.name}: cannot read image .*on_bad_image=skip"):
        run_extract(index, CFG, out, teacher=TinyTeacher())
    skip = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0, on_bad_image="skip")
    result = run_extract(index, skip, out, teacher=TinyTeacher())
    assert result.units_reused > 0  # the policy is not part of the identity: the run resumed
    store = open_store(out)
    assert [(s["split"], s["index_row"], s["image_id"], s["path"]) for s in store.skipped_images] == [
        ("train", 20, "img020", bad.name)
    ]
    assert not (out / ".extract").exists()

    # the store equals one computed from the index without that image: its captions are gone too
    clean = index.drop_images([int(np.flatnonzero(index.image_id == "img020")[0])])
    ref = tmp_path / "ref.zarr"
    run_extract(clean, CFG, ref, teacher=TinyTeacher())
    ref_store = open_store(ref)
    for name in ("train", "test"):
        a, b = store.split(name), ref_store.split(name)
        assert a.image_id.tolist() == b.image_id.tolist()
        np.testing.assert_array_equal(a.text_image, b.text_image)
        np.testing.assert_allclose(a.image_emb.astype(np.float32), b.image_emb.astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(a.text_emb.astype(np.float32), b.text_emb.astype(np.float32), atol=1e-3)
    assert store.split("train").n_images == index.split("train").n_images - 1

    # a fresh skip run gives the same bytes as the error-then-skip resumed one
    fresh = tmp_path / "fresh.zarr"
    run_extract(index, skip, fresh, teacher=TinyTeacher())
    assert verified_files(fresh) == verified_files(out)


def test_missing_image_file_is_named(tmp_path):
    index = make_dataset(tmp_path / "data", n_train=4, n_test=2)
    Path(index.split("test").image_path[1]).unlink()
    with pytest.raises(InputError, match=r"img005.jpg: cannot read image \(file not found\)"):
        run_extract(index, CFG, tmp_path / "f.zarr", teacher=TinyTeacher())


def test_config_is_checked_and_cuda_without_gpu_is_one_line():
    with pytest.raises(ConfigError, match="extract.on_bad_image: 'ignore' is not one of"):
        from_dict(ExtractConfig, {"on_bad_image": "ignore"}, "extract")
    with pytest.raises(ConfigError, match="chunk_rows must be at least 1"):
        from_dict(ExtractConfig, {"chunk_rows": 0}, "extract")
    cfg = from_dict(ExtractConfig, {"splits": ["test"], "teacher": {"kind": "beit3"}}, "extract")
    assert cfg.splits == ("test",)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="extract.device=cuda but no CUDA GPU is available"):
            resolve_device("cuda", "extract.device")
    assert resolve_device("cpu").type == "cpu"


def test_unknown_split_and_foreign_output_directory_are_refused(dataset, tmp_path):
    index, _ = dataset
    with pytest.raises(InputError, match="no split 'val'; it has train, test"):
        run_extract(index, ExtractConfig(splits=("val",)), tmp_path / "f.zarr", teacher=TinyTeacher())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(
        InputError, match="exists and is not a feature store written by kdpipe; kdpipe replaces only what it wrote"
    ):
        run_extract(index, CFG, tmp_path / "mine", teacher=TinyTeacher())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    only_test = tmp_path / "test_only.zarr"
    run_extract(index, ExtractConfig(splits=("test",), chunk_rows=8, num_workers=0), only_test, teacher=TinyTeacher())
    assert open_store(only_test).splits == ("test",)


def test_cli_missing_index_and_bad_output_exit_2_with_one_line(dataset, tmp_path):
    from stages.cli import app

    index, root = dataset
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "extract": {"num_workers": 0}}))
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--params", str(params)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no dataset index here" in lines[0]

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    r = runner.invoke(
        app, ["extract", "--params", str(params), "--index", str(root / "index"), "--out", str(tmp_path / "junk")]
    )
    assert r.exit_code == 2 and "not a feature store" in r.output

    r = runner.invoke(app, ["extract", "--params", str(params), "--set", "extract.store_dtype=int8"])
    assert r.exit_code == 2 and "extract.store_dtype: 'int8' is not one of" in r.output


# ---------------------------------------------------------------------------------------------------------
# The real teacher: a tiny random BEiT-3 in an official-format checkpoint, through the command line
# ---------------------------------------------------------------------------------------------------------
from beit3_fixtures import base_style_ckpt, tiny_spm  # noqa: E402,F401  (pytest fixtures)


def test_cli_extract_with_a_tiny_beit3_checkpoint(dataset, tmp_path, base_style_ckpt, tiny_spm):  # noqa: F811
    from pipeline.teachers.beit3 import BEiT3Teacher
    from stages.cli import app

    index, root = dataset
    ckpt, state = base_style_ckpt
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "work"),
                "extract": {
                    "teacher": {
                        "kind": "beit3",
                        "beit3": {"checkpoint": str(ckpt), "tokenizer": str(tiny_spm), "num_heads": 4},
                    },
                    "device": "auto",
                    "chunk_rows": 8,
                    "image_batch_size": 4,
                    "text_batch_size": 8,
                    "num_workers": 2,
                },
            }
        )
    )
    out = tmp_path / "work" / "features.zarr"
    r = CliRunner().invoke(app, ["extract", "--params", str(params), "--index", str(root / "index")])
    assert r.exit_code == 0, r.output
    assert "extract: wrote" in r.output and (tmp_path / "work" / "config" / "extract.yaml").is_file()

    teacher = BEiT3Teacher.from_checkpoint(ckpt, tokenizer=tiny_spm, num_heads=4)
    store = open_store(out, expect_fingerprint=index.fingerprint, expect_dim=teacher.dim)
    assert store.teacher == teacher_record(teacher) and store.teacher["checkpoint"]["file"] == ckpt.name
    assert store.logit_scale == pytest.approx(math.exp(float(state["logit_scale"])), rel=1e-6)  # the checkpoint's
    for name in index.splits:
        view, sp = index.split(name), store.split(name)
        images = [Image.open(p) for p in view.image_path]
        np.testing.assert_allclose(sp.image_emb.astype(np.float32), teacher.encode_images(images).numpy(), atol=2e-3)
        np.testing.assert_allclose(
            sp.text_emb.astype(np.float32), teacher.encode_texts(view.caption_text.tolist()).numpy(), atol=2e-3
        )

    # a missing tokenizer file: one line, exit code 2, the finished store untouched
    before = store_files(out)
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--params",
            str(params),
            "--index",
            str(root / "index"),
            "--set",
            f"extract.teacher.beit3.tokenizer={tmp_path / 'missing.spm'}",
        ],
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "missing.spm" in r.output
    assert store_files(out) == before


def test_finalization_killed_during_the_compaction_swap_completes_on_rerun(tmp_path, monkeypatch):
    import pipeline.extract.finalize as extract

    index = make_dataset(tmp_path / "data")
    _corrupt(tmp_path / "data", index)
    skip = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0, on_bad_image="skip")
    fresh = tmp_path / "fresh.zarr"
    run_extract(index, skip, fresh, teacher=TinyTeacher())

    real_replace = os.replace

    def crash_after_moving_the_old_split_away(src, dst):
        real_replace(src, dst)
        if Path(dst).parent.name == "trash":
            raise RuntimeError("killed between the two renames")

    out = tmp_path / "features.zarr"
    monkeypatch.setattr(extract.os, "replace", crash_after_moving_the_old_split_away)
    with pytest.raises(RuntimeError, match="between the two renames"):
        run_extract(index, skip, out, teacher=TinyTeacher())
    monkeypatch.setattr(extract.os, "replace", real_replace)
    assert not (out / "train").exists() and read_attrs(out)["complete"] is False
    result = run_extract(index, skip, out, teacher=TinyTeacher())
    assert result.units_computed == 0 and result.units_reused == result.units_total
    assert verified_files(out) == verified_files(fresh)  # the swapped-in split carries its own checksums


def _with_unpaired(index: DatasetIndex) -> DatasetIndex:
    """The tiny dataset with the captions of images 5..9 removed (unpaired images) and 11 texts without an
    image in train, 2 in test (unpaired texts): more rows than one chunk of 8, so several units."""
    images = list(zip(index.image_id.tolist(), index.image_path.tolist(), index.image_split.tolist()))
    captions = [(t, r) for t, r in zip(index.caption_text.tolist(), index.caption_image.tolist()) if not 5 <= r < 10]
    texts = [(f"only text {k} " + "x" * k, "train") for k in range(11)] + [("a test text", "test"), ("b", "test")]
    return DatasetIndex.from_lists(index.name, index.image_root, images, captions, unpaired_texts=texts)


def test_unpaired_images_and_texts_are_extracted_and_resume_exactly(tmp_path):
    index = _with_unpaired(make_dataset(tmp_path / "data"))
    ref = tmp_path / "ref.zarr"
    run_extract(index, CFG, ref, teacher=TinyTeacher())
    store, teacher = open_store(ref, expect_fingerprint=index.fingerprint), TinyTeacher()
    for name in ("train", "test"):
        view, sp = index.split(name), store.split(name)
        np.testing.assert_array_equal(sp.text_image, view.text_image)
        assert sp.unpaired_image.tolist() == view.unpaired_image.tolist()
        expected = teacher.encode_texts(view.unpaired_text.tolist()).numpy()
        np.testing.assert_allclose(sp.unpaired_text_emb.astype(np.float32), expected, atol=1e-3)
    assert store.split("train").unpaired_image.tolist() == [5, 6, 7, 8, 9]
    # a run that fails half way, then resumes, writes the same bytes
    out = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(index, CFG, out, teacher=TinyTeacher(fail_after=12))
    assert run_extract(index, CFG, out, teacher=TinyTeacher()).units_reused > 0
    assert verified_files(out) == store_files(ref)
    # a skipped bad image compacts its split; the unpaired texts stay
    bad = _corrupt(tmp_path / "data", index)
    skip = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0, on_bad_image="skip")
    run_extract(index, skip, tmp_path / "skip.zarr", teacher=TinyTeacher())
    compacted = open_store(tmp_path / "skip.zarr").split("train")
    assert bad.stem not in compacted.image_id.tolist() and compacted.n_images == index.split("train").n_images - 1
    np.testing.assert_array_equal(compacted.unpaired_text_emb, store.split("train").unpaired_text_emb)
