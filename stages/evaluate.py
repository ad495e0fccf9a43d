"""`kdpipe evaluate`: (being built)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, SET_OPTION, run_stage


@run_stage
def command(params: Path = PARAMS_OPTION, set_: list[str] = SET_OPTION) -> None:
    """(being built)"""
    raise typer.Exit(1)
