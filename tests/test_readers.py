"""Readers during a rewrite (issue 13): a reader that opens the feature store or the image cache while a run
rewrites it gets the old complete output, the new one, or (not waiting) one line naming the writer, never a
mix. The writer is stopped at each dangerous point by a hook (no sleeps): (a) a fresh store written over a
complete one, (b) stale chunks of a complete store redone, (c) a split compacted under on_bad_image: skip,
(d) prepare updating images.zarr (copy + swap). Values are compared with both the old and the new output."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import TinyTeacher, make_dataset, store_files
from PIL import Image

import pipeline.extract.finalize as finalize
import pipeline.locks as locks
import pipeline.store.durable as durable
import pipeline.store.features as features
from pipeline.data.file_hashes import sha256_file
from pipeline.data.index import DatasetIndex
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.locks import OutputLocked, output_lock
from pipeline.store.features import open_store, read_attrs
from pipeline.store.features_writer import StoreWriter
from pipeline.store.image_cache import open_image_cache

CFG = ExtractConfig(chunk_rows=8, image_batch_size=3, text_batch_size=5, num_workers=0)
ARRAYS = ("image_emb", "text_emb", "text_image", "image_id")


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


class Pause:
    """Called at a dangerous point by the writer: the first call stops there until the test says go."""

    def __init__(self) -> None:
        self.reached, self.go, self.armed = threading.Event(), threading.Event(), True

    def __call__(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.go.wait(60), "the test never let the writer go on"


class Thread(threading.Thread):
    """Runs fn (under `lock` when given, as a stage command holds its outputs' lock), keeping result or error."""

    def __init__(self, fn, lock: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.fn, self.lock, self.result, self.error = fn, lock, None, None

    def run(self) -> None:
        try:
            if self.lock is None:
                self.result = self.fn()
            else:
                with output_lock(self.lock):
                    self.result = self.fn()
        except BaseException as err:  # noqa: BLE001 -- handed to the test
            self.error = err

    def finish(self) -> object:
        self.join(60)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def values(store) -> dict[str, np.ndarray]:
    return {f"{s}/{k}": np.array(getattr(store.split(s), k)) for s in store.splits for k in ARRAYS}


def pixels(cache) -> dict[str, np.ndarray]:
    return {s: np.array(cache.split(s)) for s in cache.splits}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def waiting(monkeypatch) -> threading.Event:
    """Set when a reader says that it waits for a writer (locks' warning record)."""
    said = threading.Event()
    warn = locks.log.warning

    def spy(message: str, *args: object) -> None:
        if "before reading it" in message:
            said.set()
        warn(message, *args)

    monkeypatch.setattr(locks.log, "warning", spy)
    return said


def read_during(out: Path, writer: Thread, pause: Pause, waiting: threading.Event, opener) -> object:
    """At the writer's pause: a reader that does not wait is refused naming the writer; one that waits says
    so, is still waiting, and once the writer is let go gets what the finished writer left."""
    assert pause.reached.wait(60), writer.error
    with pytest.raises(OutputLocked, match=rf"being rewritten by pid {os.getpid()} on .* since "):
        opener(wait=False)
    reader = Thread(lambda: opener(wait=True))
    reader.start()
    assert waiting.wait(60)
    assert reader.is_alive()
    pause.go.set()
    writer.finish()
    return reader.finish()


def _chunk_written(monkeypatch, pause: Pause) -> None:
    original = StoreWriter.write_chunk

    def write_chunk(self, *args, **kwargs):
        digest = original(self, *args, **kwargs)
        pause()
        return digest

    monkeypatch.setattr(StoreWriter, "write_chunk", write_chunk)


def _old_store_moved_aside(monkeypatch, pause: Pause) -> None:
    """durable.replace_dir swapping the rewritten store in: stop between its two renames (no store at `out`)."""

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            os.replace(src, dst)
            if Path(dst).name.startswith(".features.zarr.old-"):
                pause()

    monkeypatch.setattr(durable, "os", Os())


def _split_moved_away(monkeypatch, pause: Pause) -> None:
    original = finalize.fsync_dir  # first called by _compact_split right after it moved the old split aside

    def fsync_dir(path):
        original(path)
        pause()

    monkeypatch.setattr(finalize, "fsync_dir", fsync_dir)


def hashed(index: DatasetIndex) -> DatasetIndex:
    return index.with_hashes([sha256_file(index.image_abspath(r)) for r in range(index.n_images)])


@pytest.mark.parametrize(
    "case", ["a: fresh store, chunk written", "a: fresh store, swap", "b: stale chunk redone", "c: compaction"]
)
def test_a_reader_during_extract_gets_the_old_or_the_new_store(tmp_path, monkeypatch, waiting, case):
    index = hashed(make_dataset(tmp_path / "data", n_train=20, n_test=5))
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    held = open_store(out)  # opened before the rerun: it keeps reading the old files
    old = values(held)

    teacher, cfg = TinyTeacher(), CFG
    if case.startswith("a"):
        teacher = TinyTeacher(seed=1)  # another teacher: the store is written anew
    if case.startswith("b"):  # image 10 replaced: train image chunk 1 alone is computed again, in a linked copy
        Image.fromarray(np.full((14, 20, 3), 200, np.uint8)).save(index.image_abspath(10), format="JPEG")
        index = hashed(index)
    if case.startswith("c"):  # image 3 broken: its split is compacted at the end
        index.image_abspath(3).write_bytes(b"not an image")
        index, cfg = hashed(index), ExtractConfig(**{**CFG.__dict__, "on_bad_image": "skip"})
    pause = Pause()
    hook = {"swap": _old_store_moved_aside, "compaction": _split_moved_away}.get(case.split()[-1], _chunk_written)
    hook(monkeypatch, pause)
    before = store_files(out)

    writer = Thread(lambda: run_extract(index, cfg, out, teacher=teacher), lock=out)
    writer.start()
    assert pause.reached.wait(60), writer.error
    # a reader without the lock (plain zarr) sees the old complete store, whole: the rewrite goes on beside it;
    # or, for the moment between the two renames that swap the new one in, no store
    if case.endswith("swap"):
        assert read_attrs(out) is None
    else:
        assert read_attrs(out)["complete"] is True and store_files(out) == before
    got = values(read_during(out, writer, pause, waiting, lambda wait: open_store(out, wait=wait)))
    new = values(open_store(out))
    assert same(got, new) and not same(new, old)
    assert same(values(held), old)
    if case.startswith("b"):  # exactly the stale chunk differs
        assert [k for k in old if not np.array_equal(old[k], new[k])] == ["train/image_emb"]
    if case.startswith("c"):
        assert len(new["train/image_id"]) == len(old["train/image_id"]) - 1


def test_a_reader_during_a_prepare_update_gets_the_old_or_the_new_cache(tmp_path, monkeypatch, waiting):
    from test_freshness import config, write_image

    from pipeline.data.prepare import run_prepare
    from pipeline.paths import ArtifactPaths

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    entries = []
    for i in range(7):
        write_image(data / "images" / f"im{i}.bmp", seed=i)
        entries.append({"filename": f"im{i}.bmp", "split": "test" if i >= 5 else "train", "sentences": [{"raw": "x"}]})
    (data / "ann.json").write_text(json.dumps({"images": entries}))
    paths = ArtifactPaths(tmp_path / "work")
    run_prepare(config(data), paths)
    held = open_image_cache(paths.images)
    old = pixels(held)
    write_image(data / "images" / "im6.bmp", seed=99)  # a test image replaced: an "updated" prepare

    pause = Pause()

    class Os:  # durable.replace_dir: stop after the old cache was moved aside, before the new one is in place
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            os.replace(src, dst)
            if Path(src) == paths.images:
                pause()

    monkeypatch.setattr(durable, "os", Os())
    writer = Thread(lambda: run_prepare(config(data), paths), lock=paths.images)
    writer.start()
    assert pause.reached.wait(60), writer.error
    assert not paths.images.exists()  # the moment between the two renames
    got = pixels(
        read_during(paths.images, writer, pause, waiting, lambda wait: open_image_cache(paths.images, wait=wait))
    )
    assert writer.result["status"] == "updated"
    new = pixels(open_image_cache(paths.images))
    assert same(got, new) and not same(new, old) and np.array_equal(new["train"], old["train"])
    assert same(pixels(held), old)  # mapped at open: the old cache's pixels, though its directory is gone


def test_a_writer_waits_for_a_reader_that_is_opening(tmp_path, monkeypatch):
    """The other order: a reader half way through opening holds the shared lock; a writer may not start."""
    index = make_dataset(tmp_path / "data", n_train=6, n_test=3)
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    monkeypatch.setattr(locks, "READER_GRACE_S", 0.0)
    pause, original = Pause(), features._open_store

    def opening(*args):
        pause()
        return original(*args)

    monkeypatch.setattr(features, "_open_store", opening)
    reader = Thread(lambda: open_store(out))
    reader.start()
    assert pause.reached.wait(60)
    with pytest.raises(OutputLocked, match=r"a reader opening it"), output_lock(out, wait=False):
        pass
    pause.go.set()
    reader.finish()
    with output_lock(out, wait=False):  # free again once the reader has opened
        assert open_store(out).splits == ("train", "test")  # the writer's own thread reads without waiting


def test_reading_where_no_lock_file_can_be_made(tmp_path, monkeypatch):
    """A location where this user may not create files (EACCES, EROFS): no kdpipe writer can write there
    through this path unless it made the lock file, which is then opened read-only and honoured."""
    index = make_dataset(tmp_path / "data", n_train=6, n_test=3)
    out = tmp_path / "features.zarr"
    run_extract(index, CFG, out, teacher=TinyTeacher())

    class Os:  # as on a read-only mount (also as root, whom chmod does not stop)
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def open(path, flags, *args):
            if flags & os.O_CREAT and not os.path.exists(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return os.open(path, flags, *args)

    monkeypatch.setattr(locks, "os", Os())
    assert open_store(out).splits == ("train", "test")  # no lock file, none can be made: opened unlocked
    assert not locks.lock_path(out).exists()
    monkeypatch.undo()
    with output_lock(out):  # a writer that could make it (another user, before the mount turned read-only)
        monkeypatch.setattr(locks, "os", Os())
        reader = Thread(lambda: open_store(out, wait=False))  # another thread: this one reads what it holds
        reader.start()
        with pytest.raises(OutputLocked, match=rf"being rewritten by pid {os.getpid()} "):
            reader.finish()
    assert open_store(out).splits == ("train", "test")


def test_a_reader_command_waits_for_a_writing_process_saying_who(tmp_path):
    """Across processes, through the CLI: `kdpipe verify` next to a process holding the store's lock says whom
    it waits for, and checks the store once that process has let go."""
    import subprocess
    import sys

    from test_locks import HOLD, _env, _wait_for

    index = make_dataset(tmp_path / "data", n_train=6, n_test=3)
    out, held, go = tmp_path / "features.zarr", tmp_path / "held", tmp_path / "go"
    run_extract(index, CFG, out, teacher=TinyTeacher())
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(held), "wait", str(go)], env=_env())
    try:
        _wait_for(held.exists, "the holder")
        reader = subprocess.Popen(
            [sys.executable, "-m", "stages", "verify", str(out)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = reader.stderr.readline()  # blocks until the reader says something
        assert f"{out}: waiting for pid {holder.pid} on " in line and "before reading it" in line
        assert reader.poll() is None
        go.touch()
        stdout, stderr = reader.communicate(timeout=60)
        assert reader.returncode == 0, stderr
        assert "all checksums match" in stdout
    finally:
        holder.kill()
        holder.wait()
