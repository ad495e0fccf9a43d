"""What the deployment commands (export, index, search, report) share: the work directory and the student
directory, from options or from params.yaml's `workdir`. They take paths and switches only (no params section)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from pipeline.paths import ArtifactPaths
from stages._common import load_params

STUDENT_OPTION = typer.Option(None, "--student", help="Student directory (default: <workdir>/student).")


def artifact_paths(params: Path, workdir: Path | None) -> ArtifactPaths:
    if workdir is not None:
        return ArtifactPaths(Path(workdir))
    wd = load_params(params).get("workdir")
    if not wd:
        raise ConfigError(f"{params}: workdir is not set (e.g. workdir: artifacts/demo); or pass --workdir")
    return ArtifactPaths(Path(wd))
