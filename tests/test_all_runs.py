"""`kdpipe distill --all` (dvc.yaml's distill stage): every run of distill.runs, two processes at once, gives the
very bits each run gives trained alone by `--variant/--seed`; a second call keeps the complete runs; the runs
the settings no longer name are removed, a folder of the user's is not; a failed run is one line naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from test_train import make_workdir, tiny_params, tree_bytes

ROOT = Path(__file__).resolve().parents[1]


def kdpipe(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDPIPE_FSYNC": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stages", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )


def make_project(project: Path, variants: dict, jobs: int = 2) -> None:
    make_workdir(project / "w")
    distill = tiny_params(project / "w", epochs=2, batch_size=4, num_workers=0)
    distill["student"]["text"]["tokenizer"] = "w/tok"
    distill["runs"] = {"seeds": [0], "variants": variants, "compare_to": "base"}
    params = {"workdir": "w", "runtime": {"threads": 1, "jobs": jobs}, "distill": distill}
    params["evaluate"] = {"gallery": "split"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


VARIANTS = {"base": {"baseline": True}, "a": {"overrides": {"lr": 0.01}}}


def test_all_runs_at_once_give_the_bits_of_each_run_alone(tmp_path):
    together, alone = tmp_path / "together", tmp_path / "alone"
    for p in (together, alone):
        make_project(p, VARIANTS)
    done = kdpipe(together, "distill", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "distill: 2 runs, 2 at once" in done.stdout
    for run in ("a-s0", "base-s0"):
        variant = run.split("-s")[0]
        single = kdpipe(alone, "distill", "--variant", variant, "--seed", "0")
        assert single.returncode == 0, single.stdout + single.stderr
        assert tree_bytes(together / "w/models" / run) == tree_bytes(alone / "w/models" / run), run
        for log in ("train", "val"):
            assert (together / f"w/curves/{log}/{run}.csv").read_bytes() == (
                alone / f"w/curves/{log}/{run}.csv"
            ).read_bytes()

    # again: every run complete, nothing trained, nothing changed
    before = tree_bytes(together / "w/models")
    again = kdpipe(together, "distill", "--all")
    assert again.returncode == 0 and again.stdout.count("holds this run, complete") == 2, again.stdout + again.stderr
    assert tree_bytes(together / "w/models") == before

    # a variant dropped from the settings: its run goes, a folder of the user's stays
    mine = together / "w/models/mine-s9"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    make_project_params(together, {"base": VARIANTS["base"]})
    third = kdpipe(together, "distill", "--all")
    assert third.returncode == 0, third.stdout + third.stderr
    assert not (together / "w/models/a-s0").exists() and not (together / "w/curves/train/a-s0.csv").exists()
    assert (mine / "notes.txt").read_text() == "mine" and "mine-s9" in third.stderr
    assert (together / "w/models/base-s0").is_dir()


def test_the_baselines_start_last_and_jobs_follow_the_cpus():
    from pipeline.runtime import RuntimeConfig, plan_jobs
    from stages._all_runs import planned_runs

    raw = {"distill": {"runs": {"seeds": [0, 1], "variants": VARIANTS, "compare_to": "base"}}}
    assert planned_runs(raw, None) == [("a", 0), ("a", 1), ("base", 0), ("base", 1)]
    assert plan_jobs(RuntimeConfig(), threads_per_run=1, on_gpu=False, cpus=2) == 2
    assert plan_jobs(RuntimeConfig(), threads_per_run=6, on_gpu=False, cpus=8) == 1
    assert plan_jobs(RuntimeConfig(), threads_per_run=1, on_gpu=True, cpus=16) == 1
    assert plan_jobs(RuntimeConfig(jobs=3), threads_per_run=1, on_gpu=True, cpus=2) == 3


def make_project_params(project: Path, variants: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["runs"]["variants"] = variants
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_failed_run_is_one_line_naming_it(tmp_path):
    project = tmp_path / "p"
    make_project(project, {"base": {"baseline": True}, "bad": {"overrides": {"train_split": "nope"}}}, jobs=1)
    out = kdpipe(project, "distill", "--all")
    assert out.returncode == 2
    assert "distill: run bad-s0 failed (exit status 2" in out.stderr
    assert "[bad-s0]" in out.stdout and "nope" in out.stdout  # its own line, shown with its name
    shutil.rmtree(project)
