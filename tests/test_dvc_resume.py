"""`dvc repro` killed during a distill run resumes it (issue 21): DVC removes a stage's outputs before it reruns
the stage, so the training state lives outside them (<workdir>/checkpoints/<run>/), and the resumed run leaves
every DVC-tracked output byte for byte as the uninterrupted run did, with `dvc status` clean.

The project is a tiny one (tests/test_train.py's dataset) with dvc.yaml's own mine and distill stages: their
commands, outs and params as the repository defines them (the code deps aside, which name this repository's files)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import make_workdir, tiny_params, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
RUN = "a-s0"  # the one run of the project's distill.runs


def env() -> dict[str, str]:
    """This tree's code behind the `kdpipe` the stage runs, one thread, no progress bars."""
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "KDPIPE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env(), capture_output=True, text=True, timeout=600
    )


def make_project(project: Path) -> None:
    make_workdir(project / "w")
    stages = {}
    for name in ("mine", "distill"):  # mine: every distill run depends on its store
        stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
        stage["deps"] = [d for d in stage["deps"] if not d.startswith(("pipeline/", "stages/"))]
        stages[name] = stage
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    distill = tiny_params(project / "w", epochs=3, checkpoint_every_steps=2, lr=0.05, batch_size=4)
    distill["student"]["text"]["tokenizer"] = "w/tok"  # relative: the run's records do not name the tmp dir
    distill["runs"] = {"seeds": [0], "variants": {"a": {}}, "compare_to": "a"}
    params = {"workdir": "w", "runtime": {"threads": 1}, "mine": {"k": 2}, "distill": distill}
    params["evaluate"] = {"gallery": "split"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init = dvc(project, "init", "--no-scm")
    assert init.returncode == 0, init.stderr


def outputs(project: Path) -> dict[str, bytes]:
    """Every file of the stage's DVC outputs."""
    files = {f"models/{k}": v for k, v in tree_bytes(project / "w/models" / RUN).items()}
    for log in ("train", "val"):
        files[f"curves/{log}"] = (project / f"w/curves/{log}/{RUN}.csv").read_bytes()
    return files


def repro_killed_after_a_checkpoint(project: Path) -> None:
    """`dvc repro`, killed (SIGKILL to DVC and the command) once distill has written a mid-run checkpoint."""
    ckpt = project / "w/checkpoints" / RUN / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: DVC and the stage's command are killed together
    )
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), "no checkpoint before the run ended"
    assert not (project / "w/models" / RUN / "train_summary.json").exists(), "the run completed before the kill"


def test_dvc_repro_killed_in_distill_resumes_to_the_uninterrupted_outputs(tmp_path):
    pytest.importorskip("dvc", reason="dvc is the optional extra kdpipe[dvc]")
    project = tmp_path / "p"
    make_project(project)
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    uninterrupted, lock = outputs(project), (project / "dvc.lock").read_text()
    assert not (project / "w/checkpoints" / RUN / "last.pt").exists()  # removed once the run completed

    # back to a project that never finished the stage: no outputs, no lock, nothing in DVC's cache
    for done in ("w/models", "w/curves", "w/checkpoints", ".dvc/cache"):
        shutil.rmtree(project / done)
    (project / "dvc.lock").unlink()
    repro_killed_after_a_checkpoint(project)
    again = dvc(project, "repro")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "distill: resuming from" in again.stdout + again.stderr  # resumed, not trained over

    resumed = outputs(project)
    assert list(resumed) == list(uninterrupted)
    for name, data in uninterrupted.items():
        assert resumed[name] == data, name
    assert (project / "dvc.lock").read_text() == lock  # the very hashes of the uninterrupted run
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    assert not (project / "w/checkpoints" / RUN / "last.pt").exists()
