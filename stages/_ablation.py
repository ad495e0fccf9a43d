"""`--ablation FILE` of `kdpipe distill` and `kdpipe evaluate`: an ablation's params file (one section, `ablation`:
pipeline/runs.py AblationConfig), beside the main params.yaml whose data and runs it builds on."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pipeline.config import from_dict
from pipeline.errors import ConfigError
from stages._common import load_params

if TYPE_CHECKING:
    from pipeline.runs import AblationConfig

ABLATION_OPTION = typer.Option(
    None,
    "--ablation",
    help="An ablation's params file (section `ablation`, e.g. ablation/params.yaml): its runs instead of "
    "distill.runs, into its own work directory.",
)


def load_ablation(path: Path) -> AblationConfig:
    """An ablation's params file: one section, `ablation` (pipeline/runs.py AblationConfig). Whether its
    base and seeds are those of distill.runs is checked where the two meet (`ablation_section`, evaluate)."""
    from pipeline.runs import AblationConfig  # on use: the CLI starts without the distill package

    raw = load_params(path)
    if set(raw) != {"ablation"}:
        other = sorted(set(raw) - {"ablation"})
        raise ConfigError(
            f"{path}: an ablation's params file holds one section, `ablation`"
            + (f"; found {other[0]!r}" if other else "; it is missing")
        )
    section = raw["ablation"] if isinstance(raw["ablation"], dict) else {}
    required = [f.name for f in fields(AblationConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in section]
    if missing:
        raise ConfigError(f"{path}: ablation.{missing[0]} is missing (an ablation names {', '.join(required)})")
    return from_dict(AblationConfig, section, "ablation")
