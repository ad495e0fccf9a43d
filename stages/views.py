"""`kdpipe views`: the teacher's features of several views of every training image, each view a box of the
student's frame (view 0 its own), with the boxes: `<workdir>/views.zarr` (resumable; pipeline/extract/views.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import (
    NO_WAIT_OPTION,
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    echo,
    load_raw,
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
    out: Path = typer.Option(None, "--out", help="Views store to write (default: <workdir>/views.zarr)."),
    ablation: Path = typer.Option(
        None,
        "--ablation",
        help="An ablation's params file (e.g. ablation/params.yaml): write into its work directory's views.zarr "
        "(its runs with distill.teacher_views read that store).",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Start over even if a partial views store could be resumed."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Embed several views of every training image with the teacher, for view-matched targets (optional)."""
    from pipeline.config import from_dict
    from pipeline.data.index import DatasetIndex
    from pipeline.data.pixels import PixelRecipe
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.views import ViewsConfig
    from pipeline.extract.views_store import run_views
    from pipeline.paths import ArtifactPaths
    from pipeline.store.image_cache import open_image_cache

    cfg, paths = load_stage(params, "views", ViewsConfig, set_, workdir)
    extract_cfg = from_dict(ExtractConfig, load_raw(params, set_).get("extract"), "extract")
    if ablation is not None:
        from stages._ablation import load_ablation

        out = out or ArtifactPaths(load_ablation(ablation).workdir).views
    out = out or paths.views
    # the boxes are fractions of the frame the student's cache holds: its recipe, as prepare recorded it
    recipe = PixelRecipe.of_cache(open_image_cache(paths.images).attrs, str(paths.images))
    with writing(out, no_wait=no_wait):
        dataset = DatasetIndex.load(paths.index_dir)
        result = run_views(dataset, extract_cfg, cfg, recipe, out, features=paths.features, fresh=fresh)
        save_resolved(cfg, paths, "views")
    echo(result.summary())
