"""`kdpipe distill --all`: every run of distill.runs (or, with --ablation, of the ablation's variants), each in a
process of its own (`kdpipe distill --variant V --seed S`, the command a run has by hand), as many at once as
`runtime.jobs` allows (pipeline/runtime.py `plan_jobs`: on 2 CPU cores two runs of one intra-op thread train in
about the time of one).

A run's numbers do not depend on how many train beside it: each process plans its own threads exactly as when
it runs alone (tests/test_all_runs.py checks the bits). A run found complete is skipped and a killed one resumes
from its checkpoint, as by hand, so `dvc repro` after a kill redoes only what was lost; the directories of runs
the settings no longer name (kdpipe's own, under models/ and curves/) are removed, so that the stage's outputs
are the runs of the settings. The longest runs start first (the baselines, which train without the teacher's
terms, last). Each run's lines are shown with its name; a failed run stops the others (they resume later) and
ends the command with one line naming it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.paths import ArtifactPaths
from stages._common import echo

log = logging.getLogger(__name__)


def planned_runs(raw: dict[str, Any], ablation: Any) -> list[tuple[str, int]]:
    """(variant, seed) of every run to train, the baselines last."""
    from pipeline.runs import split_runs

    if ablation is not None:
        return [(v, s) for v in ablation.variants for s in ablation.seeds]
    runs, _ = split_runs(raw.get("distill"))
    if runs is None or not runs.variants:
        raise ConfigError("distill.runs: no variants to train (`kdpipe distill --all` trains the runs it lists)")
    order = sorted(runs.variants, key=lambda v: runs.variants[v].baseline)  # stable: params order otherwise
    return [(v, s) for v in order for s in runs.seeds]


def jobs_for(raw: dict[str, Any], sections: list[dict[str, Any]], n_runs: int) -> int:
    """How many runs train at once (runtime.jobs, or what the CPUs hold; one on a GPU)."""
    from pipeline.config import from_dict
    from pipeline.distill.config import DistillConfig
    from pipeline.runtime import RuntimeConfig, plan_jobs, plan_threads

    rc = from_dict(RuntimeConfig, raw.get("runtime"), "runtime")
    cfgs = [from_dict(DistillConfig, s, "distill") for s in sections]
    on_gpu = any(c.device.startswith("cuda") for c in cfgs) or (any(c.device == "auto" for c in cfgs) and _has_gpu())
    threads = max(plan_threads(rc, c.num_workers) for c in cfgs)
    return max(1, min(n_runs, plan_jobs(rc, threads, on_gpu)))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def remove_other_runs(out: ArtifactPaths, names: list[str]) -> None:
    """The run directories (and curves, checkpoints) under `out` of runs not in `names`, where kdpipe wrote them."""
    from pipeline.store.ownership import claim
    from pipeline.towers.student import STUDENT_DIR

    models = out.workdir / "models"
    if not models.is_dir():
        return
    for entry in sorted(models.iterdir()):
        if entry.name in names or not entry.is_dir() or "-s" not in entry.name:
            continue
        try:
            claim(entry, STUDENT_DIR)  # a folder of the user's is left alone, and named
        except InputError as err:
            log.warning(f"{err}: left in place, though no run of the settings writes it")
            continue
        log.info(f"distill: removing {entry}, a run the settings no longer have")
        shutil.rmtree(entry)
        for curve in out.training_curves(entry.name).values():
            curve.unlink(missing_ok=True)
        shutil.rmtree(out.checkpoints(entry.name), ignore_errors=True)


def run_all(runs: list[tuple[str, int]], args: list[str], jobs: int, names: list[str]) -> None:
    """Train `runs` (`names`: their directory names) by `kdpipe distill <args> --variant V --seed S`, `jobs` at
    once; raise InputError naming the first that fails, after stopping the others."""
    from pipeline.progress import progress

    env = {**os.environ, "KDPIPE_PROGRESS": "0"}  # one bar here; the runs' own would tear each other
    pending = list(zip(runs, names))
    running: dict[str, subprocess.Popen] = {}
    pumps: list[threading.Thread] = []
    failed: tuple[str, int] | None = None
    done = threading.Event()
    finished: list[tuple[str, int]] = []
    lock = threading.Lock()

    def start(run: tuple[str, int], name: str) -> None:
        cmd = [sys.executable, "-m", "stages", "distill", *args, "--variant", run[0], "--seed", str(run[1])]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        running[name] = proc

        def pump() -> None:
            for line in proc.stdout:
                echo(f"[{name}] {line.rstrip()}")
            rc = proc.wait()
            with lock:
                finished.append((name, rc))
            done.set()

        t = threading.Thread(target=pump, name=f"kdpipe-run-{name}", daemon=True)
        t.start()
        pumps.append(t)

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with progress("distill: runs", total=len(runs), unit="runs") as bar:
            while (pending or running) and failed is None:
                while pending and len(running) < jobs:
                    start(*pending.pop(0))
                done.wait()
                with lock:
                    ended, finished[:] = list(finished), []
                    done.clear()
                for name, rc in ended:
                    running.pop(name)
                    bar.advance(1)
                    if rc != 0 and failed is None:
                        failed = (name, rc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running.values():  # stopped here, they resume from their checkpoints next time
            if proc.poll() is None:
                proc.terminate()
        for proc in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for t in pumps:
            t.join(timeout=5)
    if failed is not None:
        name, rc = failed
        raise InputError(
            f"distill: run {name} failed (exit status {rc}; its lines above); the runs that completed are kept, "
            "and the same command resumes the others"
        )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # through `finally`: the runs are stopped too


def child_args(params: Path, set_: list[str], workdir: Path | None, ablation: Path | None, resume: bool, no_wait: bool):
    """The options every run's own command repeats."""
    args = ["--params", str(params), *(f"--set={s}" for s in set_ or ())]
    args += ["--workdir", str(workdir)] if workdir is not None else []
    args += ["--ablation", str(ablation)] if ablation is not None else []
    args += [] if resume else ["--no-resume"]
    args += ["--no-wait"] if no_wait else []
    return args
