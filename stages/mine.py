"""`kdpipe mine`: the teacher's K nearest images of every caption and captions of every image, over the whole
bank, exactly; with `mine.cross_encoder`, a cross-encoder's scores on each caption's positive and mined images
and each image's mined captions. Writes `<workdir>/mined.zarr` (resumable; format in the README).
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import (
    NO_WAIT_OPTION,
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    ablation_stage,
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
    features: Path = typer.Option(None, "--features", help="Feature store (default: <workdir>/features.zarr)."),
    index: Path = typer.Option(None, "--index", help="Dataset index directory (default: <workdir>/index)."),
    out: Path = typer.Option(None, "--out", help="Mined store to write (default: <workdir>/mined.zarr)."),
    ablation: Path = typer.Option(
        None,
        "--ablation",
        help="An ablation's params file (e.g. ablation/params.yaml): mine with its `mine` keys merged into this "
        "file's, into its work directory's mined.zarr (its runs read that store).",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Start over even if a partial mined store could be resumed."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Mine the teacher's hardest neighbours over the whole bank (exact, resumable) and score them."""
    from pipeline.data.index import DatasetIndex
    from pipeline.mine.run import MineConfig, run_mine

    cfg, paths = load_stage(params, "mine", MineConfig, set_, workdir)
    out = out or paths.mined
    if ablation is not None:  # the data is this file's; the settings and the output the ablation's
        cfg, abl_paths = ablation_stage(params, set_, ablation, "mine", MineConfig)
        out = abl_paths.mined
    with writing(out, no_wait=no_wait):
        dataset = DatasetIndex.load(index or paths.index_dir)
        result = run_mine(features or paths.features, cfg, out, index=dataset, fresh=fresh)
        save_resolved(cfg, paths, "mine")
    echo(result.summary())
