"""What the deployment commands (export, index, search, report) share: the work directory and the student
directory, from options or from params.yaml (`workdir`, and `distill.runs` for the default student). They take
paths and switches only (no params section of their own)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from pipeline.paths import ArtifactPaths
from pipeline.runs import run_name, split_runs
from stages._common import apply_runtime, load_params, workdir_paths

STUDENT_OPTION = typer.Option(
    None,
    "--student",
    help="Student directory (default: <workdir>/student; with distill.runs, the first seed of its first distilled "
    "variant, e.g. models/student-s0).",
)


def artifact_paths(params: Path, workdir: Path | None) -> ArtifactPaths:
    """The work directory; also applies the params file's `runtime` section (its defaults when there is none:
    these commands embed images and texts on the CPU too)."""
    raw = load_params(params) if workdir is None or params.is_file() else {}
    apply_runtime(raw)
    if workdir is not None:
        return workdir_paths(workdir, "--workdir")
    if not raw.get("workdir"):
        raise ConfigError(f"{params}: workdir is not set (e.g. workdir: artifacts/demo); or pass --workdir")
    return workdir_paths(raw["workdir"], f"{params}: workdir")


def default_models(params: Path, paths: ArtifactPaths) -> dict[str, Path]:
    """The student and the baseline these commands use unless told, by name: with `distill.runs` (the demo),
    the first seed of the first variant that is distilled (not a baseline, not in `compare_to`) and of
    `compare_to`'s first, as dvc.yaml trains them; else, or where that run is not there but distill's own output is
    (a `--workdir` trained without runs), <workdir>/student and <workdir>/baseline."""
    plain = {"student": paths.student, "baseline": paths.workdir / "baseline"}
    raw = load_params(params) if params.is_file() else {}
    runs, _ = split_runs(raw.get("distill"))
    if runs is None or not runs.variants:
        return plain
    seed = runs.seeds[0]
    distilled = [v for v, c in runs.variants.items() if not c.baseline and v not in runs.compare_to]
    named = {v: paths.model(run_name(v, seed)) for v in distilled[:1]}
    first_reference = runs.compare_to[0]  # the one the others are measured against first (the demo: baseline)
    named[first_reference] = paths.model(run_name(first_reference, seed))
    if not _is_student(next(iter(named.values()))) and _is_student(paths.student):
        return plain
    return named


def every_model(params: Path, paths: ArtifactPaths) -> dict[str, Path]:
    """Every trained model, by name, as evaluate shows them (the report): with `distill.runs`, the first seed of
    each variant in the params file's order; else, or where those runs are not there, `default_models`."""
    raw = load_params(params) if params.is_file() else {}
    runs, _ = split_runs(raw.get("distill"))
    if runs is None or not runs.variants:
        return default_models(params, paths)
    named = {v: paths.model(run_name(v, runs.seeds[0])) for v in runs.variants}
    return named if any(_is_student(d) for d in named.values()) else default_models(params, paths)


def default_student(params: Path, paths: ArtifactPaths) -> Path:
    return next(iter(default_models(params, paths).values()))


def _is_student(directory: Path) -> bool:
    return (directory / "student_config.json").is_file()
