"""The one durable-write helper: atomic replacement, no debris on failure, fsync exactly when enabled."""

import os
import subprocess
import sys

import pytest

from pipeline.store import durable
from pipeline.store.durable import atomic_dir, atomic_path, remove_partial_files, replace_dir, write_file_durably
from pipeline.store.ownership import Output

PNGS = Output("a test's plots", directory=True, names=frozenset({"a.png", "b.png", "stale.png", "fresh.png"}))


def test_write_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_file_durably(target, b"old")
    write_file_durably(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_fsync_follows_kdpipe_fsync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(durable.os, "fsync", lambda fd: calls.append(fd))
    monkeypatch.setenv("KDPIPE_FSYNC", "1")
    write_file_durably(tmp_path / "a", b"x")
    assert len(calls) == (2 if os.name == "posix" else 1)  # the file, then its directory (the rename)
    calls.clear()
    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    write_file_durably(tmp_path / "b", b"x")
    assert calls == []


def test_replace_dir_swaps_whole_directories(tmp_path):
    old, new = tmp_path / "plots", tmp_path / ".plots.tmp"
    old.mkdir()
    (old / "stale.png").write_bytes(b"1")
    new.mkdir()
    (new / "fresh.png").write_bytes(b"2")
    replace_dir(new, old, PNGS)
    assert [p.name for p in old.iterdir()] == ["fresh.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["plots"]


def test_remove_partial_files_removes_ours_and_zarrs(tmp_path):
    (tmp_path / "c" / "0").mkdir(parents=True)
    (tmp_path / "c" / "0" / "0.3f2a.partial").write_bytes(b"")  # zarr's LocalStore temp name
    (tmp_path / ".zarr.json.12-ab.partial").write_bytes(b"")  # ours
    (tmp_path / "zarr.json").write_bytes(b"{}")
    remove_partial_files(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["zarr.json"]


def test_atomic_dir_removes_what_a_killed_writer_left_and_keeps_a_live_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".plots.{dead.pid}-0123abcd.partial"  # SIGKILLed inside atomic_dir
        old = tmp_path / ".plots.old-0123456789ab"  # SIGKILLed inside replace_dir, between swap and delete
        busy = tmp_path / f".plots.{live.pid}-89abcdef.partial"  # a writer still at work
        other = tmp_path / f".plots.v2.{dead.pid}-0123abcd.partial"  # another target's (plots.v2): not ours
        for d in (stale, old, busy, other):
            d.mkdir()
            (d / "a.png").write_bytes(b"1")
        with atomic_dir(tmp_path / "plots", PNGS) as tmp:
            (tmp / "b.png").write_bytes(b"2")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name, "plots"])
        assert [p.name for p in (tmp_path / "plots").iterdir()] == ["b.png"]
    finally:
        live.kill()
        live.wait()
