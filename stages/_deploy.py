"""What the deployment commands (export, index, search, report) share: the work directory and the student
directory, from options or from params.yaml's `workdir`. They take paths and switches only (no params section)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from pipeline.paths import ArtifactPaths
from stages._common import apply_runtime, load_params

STUDENT_OPTION = typer.Option(None, "--student", help="Student directory (default: <workdir>/student).")


def artifact_paths(params: Path, workdir: Path | None) -> ArtifactPaths:
    """The work directory; also applies the params file's `runtime` section (its defaults when there is none:
    these commands embed images and texts on the CPU too)."""
    raw = load_params(params) if workdir is None or params.is_file() else {}
    apply_runtime(raw)
    if workdir is not None:
        return ArtifactPaths(Path(workdir))
    wd = raw.get("workdir")
    if not wd:
        raise ConfigError(f"{params}: workdir is not set (e.g. workdir: artifacts/demo); or pass --workdir")
    return ArtifactPaths(Path(wd))
