"""`kdpipe extract`: run the teacher over every image and caption of the index and write features.zarr.

Multi-GPU / multi-node: `torchrun --nproc-per-node N -m stages extract ...` (each rank computes its share
of the chunks; rank 0 prepares and finalizes the store and prints the summary).
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
    is_main_process,
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
    index: Path = typer.Option(None, "--index", help="Dataset index directory (default: <workdir>/index)."),
    out: Path = typer.Option(None, "--out", help="Feature store to write (default: <workdir>/features.zarr)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over even if a partial store could be resumed."),
    ablation: Path = typer.Option(
        None,
        "--ablation",
        help="An ablation's params file (e.g. ablation/params.yaml): extract with its `extract` keys merged into "
        "this file's, into its work directory's features.zarr, the main teacher's rows copied from this file's "
        "store (its runs read that store).",
    ),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Compute the teacher's L2-normalized features of all images and captions (resumable, torchrun-aware)."""
    from pipeline.data.index import DatasetIndex
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import run_extract

    cfg, paths = load_stage(params, "extract", ExtractConfig, set_, workdir)
    source = None
    if ablation is not None:  # the data and the main teacher's rows are this file's; the rest the ablation's
        from pipeline.store.features import open_store

        cfg, abl_paths = ablation_stage(params, set_, ablation, "extract", ExtractConfig)
        out = out or abl_paths.features
        source = open_store(paths.features)
    out = out or paths.features
    with writing(out, no_wait=no_wait):  # rank 0 locks before run_extract joins the process group
        dataset = DatasetIndex.load(index or paths.index_dir)
        result = run_extract(dataset, cfg, out, fresh=fresh, source=source)
        if is_main_process():
            save_resolved(cfg, paths, "extract")
    if is_main_process():
        echo(result.summary())
