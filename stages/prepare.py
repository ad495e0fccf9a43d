"""`kdpipe prepare`: read the dataset, write the index and the student image cache (images.zarr)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages._common import (
    NO_WAIT_OPTION,
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    echo,
    load_stage,
    run_stage,
    save_resolved,
    writing,
)


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    workdir: Path = WORKDIR_OPTION,
    force: bool = typer.Option(False, "--force", help="Decode again even if the outputs are up to date."),
    verify: bool = typer.Option(
        False, "--verify", help="Hash every image file, not only those whose size or mtime changed."
    ),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Decode every image once into the uint8 student-resolution cache, and write the dataset index."""
    from pipeline.data.prepare import PrepareConfig, run_prepare
    from pipeline.store.durable import naming

    cfg, paths = load_stage(params, "prepare", PrepareConfig, set_, workdir)
    with writing(paths.index_dir, paths.images, no_wait=no_wait):
        with naming(paths.images):  # the decode tasks' writes into the cache name no file when the disk fills
            summary = run_prepare(cfg, paths, force=force, verify=verify)
        save_resolved(cfg, paths, "prepare")
    echo(json.dumps(summary))
