"""One writer per output: the lock names its holder, waits or refuses, is taken over from a dead process,
is the job's (rank 0's) under torchrun, and two `kdpipe extract` racing on one workdir end with one
complete store equal to a single run's, in both bad-image modes (issue 13, item 1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from extract_helpers import TinyTeacher, make_dataset, store_files

from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.locks import OutputLocked, lock_path, output_lock
from pipeline.store.features import open_store
from stages._common import writing

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _env() -> dict[str, str]:
    return dict(os.environ, KDPIPE_PROGRESS="0", PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holder_pid(out: Path) -> int | None:
    try:
        text = lock_path(out).read_text().strip()
    except FileNotFoundError:
        return None
    return json.loads(text)["pid"] if text else None


def test_second_holder_is_refused_naming_the_first_and_a_clean_release_empties_the_record(tmp_path):
    out = tmp_path / "features.zarr"
    with output_lock(out):
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # flock locks belong to the open file: a second open in the same process conflicts like another process
        with pytest.raises(OutputLocked, match=rf"{out}: being written by pid {os.getpid()} on .*--no-wait"):
            with output_lock(out, wait=False):
                pass
    assert lock_path(out).read_text() == ""  # released cleanly: nothing to take over
    said = []
    with output_lock(out, wait=False, say=said.append):
        pass
    assert said == []


HOLD = """
import os, signal, sys, time
from pipeline.locks import output_lock
with output_lock(sys.argv[1]):
    open(sys.argv[2], "w").close()  # "I hold it"
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock: no clean release
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.02)
"""


def test_waits_for_the_holder_saying_who_then_takes_the_lock(tmp_path):
    out, held, go = tmp_path / "student", tmp_path / "held", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(held), "wait", str(go)], env=_env())
    try:
        _wait_for(held.exists, "the holder")
        said = []

        def say(message: str) -> None:
            said.append(message)
            go.touch()  # let the holder finish once we have said whom we wait for

        with output_lock(out, poll_s=0.02, say=say):
            assert proc.wait(timeout=30) == 0  # we got the lock only after the holder ended
            assert _holder_pid(out) == os.getpid()
        assert len(said) == 1 and said[0].startswith(f"{out}: waiting for pid {proc.pid} on {socket.gethostname()}")
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over_and_said(tmp_path):
    out, held = tmp_path / "features.zarr", tmp_path / "held"
    proc = subprocess.run([sys.executable, "-c", HOLD, str(out), str(held), "die", "-"], env=_env())
    assert proc.returncode == -signal.SIGKILL and _holder_pid(out) is not None
    dead = _holder_pid(out)
    said = []
    with output_lock(out, wait=False, say=said.append):  # flock died with its process: no waiting
        assert _holder_pid(out) == os.getpid()
    assert len(said) == 1 and f"taking over the lock of pid {dead} " in said[0]


def test_torchrun_ranks_share_their_jobs_lock(tmp_path, monkeypatch):
    out = tmp_path / "student"
    with output_lock(out):  # rank 0 of the job holds it
        monkeypatch.setenv("RANK", "1")
        with writing(out, no_wait=True):  # another rank of the same job neither waits nor refuses
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputLocked):  # rank 0 of another job does
            with writing(out, no_wait=True):
                pass


# every command that writes takes its output's lock (before it reads its inputs, so none are needed here)
WRITERS = {  # command line after `kdpipe` -> the output it locks, relative to the work directory
    "fit-teacher": (["fit-teacher"], "teacher"),
    "fit-cross-encoder": (["fit-cross-encoder"], "cross_encoder"),
    "prepare": (["prepare"], "images.zarr"),
    "extract": (["extract"], "features.zarr"),
    "distill": (["distill"], "student"),
    "distill-run": (["distill", "--variant", "student", "--seed", "1"], "models/student-s1"),
    "evaluate": (["evaluate"], "metrics.json"),
    "export": (["export", "--student", "{work}/student"], "export/student"),
    "index": (["index"], "search/test-flat"),
    "report": (["report"], "report.html"),
    "demo-data": (["demo-data", "--out", "{work}/emoji"], "emoji"),
    "export-hdf5": (["export-hdf5", "{work}/features.zarr", "--out", "{work}/f.h5"], "f.h5"),
    "import-hdf5": (["import-hdf5", "{work}/f.h5", "--out", "{work}/features.zarr"], "features.zarr"),
    "import-dsmd": (
        ["import-dsmd", "--index", "{work}/index", "--out", "{work}/features.zarr"]
        + ["--images", "test=i.pt", "--texts", "test=t.pt"],
        "features.zarr",
    ),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_writing_command_takes_its_outputs_lock(tmp_path, name):
    from typer.testing import CliRunner

    from stages.cli import app

    work = tmp_path / "work"
    args, output = WRITERS[name]
    args = [a.format(work=work) for a in args]
    if name not in ("demo-data", "export-hdf5", "import-hdf5", "import-dsmd"):
        args += ["--params", str(REPO / "params.yaml"), "--workdir", str(work)]
    with output_lock(work / output):
        r = CliRunner().invoke(app, [*args, "--no-wait"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {work / output}: being written by pid {os.getpid()} "), r.output


# -- two `kdpipe extract` racing on one workdir ------------------------------------------------------------
EXTRACT = """
import os, sys, time
from extract_helpers import TinyTeacher
import pipeline.extract.run as extract

GO = sys.argv[1]

class Gated(TinyTeacher):  # the first run holds its images until the test says go
    def encode_image_batch(self, pixels):
        while not os.path.exists(GO):
            time.sleep(0.02)
        return super().encode_image_batch(pixels)

extract.build_teacher = lambda cfg, device, dtype: Gated()
from stages.cli import app
app(sys.argv[2:], prog_name="kdpipe")
"""


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_two_extracts_racing_on_one_workdir_end_with_one_complete_correct_store(tmp_path, mode):
    root = tmp_path / "data"
    index = make_dataset(root, n_train=10, n_test=4)
    if mode == "skip":  # a bad image: the two compactions collided in issue 13
        index.image_abspath(2).write_bytes(b"not an image")
    index.save(root / "index")
    cfg = {"chunk_rows": 8, "image_batch_size": 3, "text_batch_size": 5, "num_workers": 0, "on_bad_image": mode}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "extract": cfg}))
    out, go = tmp_path / "work" / "features.zarr", tmp_path / "go"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(EXTRACT))
    args = ["extract", "--params", str(params), "--index", str(root / "index")]

    def start(*extra: str, log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as f:
            return subprocess.Popen(
                [sys.executable, str(script), str(go), *args, *extra], env=_env(), stdout=f, stderr=subprocess.STDOUT
            )

    first = start(log="first.log")
    try:
        _wait_for(lambda: _holder_pid(out) == first.pid, "the first run to lock the store")
        second = start(log="second.log")
        refused = start("--no-wait", log="refused.log")
        assert refused.wait(timeout=120) == 2
        lines = [ln for ln in (tmp_path / "refused.log").read_text().splitlines() if ln.strip()]
        assert len(lines) == 1 and f"being written by pid {first.pid} on {socket.gethostname()}" in lines[0]
        _wait_for(lambda: "waiting for pid" in (tmp_path / "second.log").read_text(), "the second run to wait")
        assert f"waiting for pid {first.pid} " in (tmp_path / "second.log").read_text()
        go.touch()
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
        assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    finally:
        go.touch()
        for p in (first, locals().get("second"), locals().get("refused")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    store = open_store(out, expect_fingerprint=index.fingerprint)  # complete, or it would refuse
    assert not (out / ".extract").exists()
    assert [s["index_row"] for s in store.skipped_images] == ([2] if mode == "skip" else [])
    reference = tmp_path / "reference.zarr"  # one uninterrupted run, in this process
    run_extract(index, ExtractConfig(**cfg), reference, teacher=TinyTeacher())
    assert store_files(out) == store_files(reference)
