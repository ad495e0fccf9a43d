"""`kdpipe distill`: train the student against the stored teacher features (section `distill`).

Reads the dataset index, prepare's image cache and extract's feature store from the work directory,
refuses any of them that belongs to another index (fingerprint) or is incomplete, and writes the student
into `<workdir>/student/` (with `--baseline`: the undistilled baseline, trained with `distill.baseline_loss`
on the pairs alone, into `<workdir>/baseline/`). Under torchrun every process runs this same command.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from stages._common import (
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    echo,
    is_main_process,
    load_stage,
    run_stage,
    save_resolved,
)


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    workdir: Path = WORKDIR_OPTION,
    baseline: bool = typer.Option(
        False, "--baseline", help="Train the undistilled baseline (pairs only) into <workdir>/baseline/."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from the last checkpoint if its config matches."
    ),
) -> None:
    """Train the student (or the baseline) from the feature store; export the best epoch on val."""
    from pipeline.data.index import DatasetIndex
    from pipeline.distill.run import DistillConfig, run_distill
    from pipeline.store.features import open_store
    from pipeline.store.image_cache import open_image_cache

    cfg, paths = load_stage(params, "distill", DistillConfig, set_, workdir)
    index = DatasetIndex.load(paths.index_dir)
    store = open_store(paths.features, expect_fingerprint=index.fingerprint, expect_dim=cfg.teacher_dim)
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    out_dir = paths.workdir / "baseline" if baseline else paths.student
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        if is_main_process():
            save_resolved(cfg, paths, "distill")
        result = run_distill(
            cfg, index=index, store=store, cache=cache, out_dir=out_dir, baseline=baseline, resume=resume
        )
    finally:
        if distributed:
            dist.destroy_process_group()
    if is_main_process():
        best = f", best val RSUM {result.best_rsum:.2f} at epoch {result.best_epoch}" if result.best_epoch > 0 else ""
        echo(f"distill: {result.epochs_done} epochs, {result.global_step} steps{best}; student in {out_dir}")
