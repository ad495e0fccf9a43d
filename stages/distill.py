"""`kdpipe distill`: train the student against the stored teacher features (section `distill`).

Reads the dataset index, prepare's image cache and extract's feature store from the work directory,
refuses any of them that belongs to another index (fingerprint) or is incomplete, and writes the student
into `<workdir>/student/` (with `--baseline`: the undistilled baseline, trained with `distill.baseline_loss`
on the pairs alone, into `<workdir>/baseline/`). With `--variant NAME --seed S`: one run of `distill.runs`
(pipeline/distill/runs.py), the variant's settings merged into the section, into `<workdir>/models/NAME-sS/`,
its training logs also copied to `<workdir>/curves/{train,val}/NAME-sS.csv` (small, uncached: `dvc plots`).
Under torchrun every process runs this same command.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.paths import ArtifactPaths
from stages._common import (
    NO_WAIT_OPTION,
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    apply_runtime,
    artifact_paths,
    echo,
    is_main_process,
    load_raw,
    run_stage,
    writing,
)
from stages._store import verify_if_asked


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
    variant: str = typer.Option(
        None, "--variant", help="Train this variant of distill.runs (with --seed) into <workdir>/models/VARIANT-sSEED/."
    ),
    seed: int = typer.Option(None, "--seed", help="The seed of the --variant run (one of distill.runs.seeds)."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Train the student (or the baseline) from the feature store; export the best epoch on val."""
    from pipeline.config import from_dict
    from pipeline.distill.config import DistillConfig
    from pipeline.distill.runs import run_name, split_runs, variant_section
    from pipeline.errors import ConfigError

    raw = load_raw(params, set_)
    paths = artifact_paths(raw, params, workdir)
    run = None
    if variant is None and seed is None:  # the single student (or --baseline) of a params file without runs
        section = split_runs(raw.get("distill"))[1]
    elif variant is None or seed is None or baseline:
        raise ConfigError("--variant and --seed go together, and a variant says itself whether it is a baseline")
    else:
        section, baseline = variant_section(raw.get("distill"), variant, seed)
        run = run_name(variant, seed)
    cfg = from_dict(DistillConfig, section, "distill")
    apply_runtime(raw, cfg.num_workers)
    verify_if_asked(raw, paths.features)
    out_dir = paths.model(run) if run else paths.workdir / "baseline" if baseline else paths.student
    if run:  # before hours of training: the copies of its curves must be able to go where they go
        from pipeline.store.ownership import claim

        for log, target in paths.training_curves(run).items():
            claim(target, training_curve(log))
    # rank 0 locks before joining the process group: the other ranks wait in the rendezvous meanwhile
    with writing(out_dir, no_wait=no_wait):
        result = train(cfg, paths, out_dir, run=run, baseline=baseline, resume=resume)
    if is_main_process():
        best = f", best val RSUM {result.best_rsum:.2f} at epoch {result.best_epoch}" if result.best_epoch > 0 else ""
        echo(f"distill: {result.epochs_done} epochs, {result.global_step} steps{best}; student in {out_dir}")


def train(cfg, paths: ArtifactPaths, out_dir: Path, *, run: str | None, baseline: bool, resume: bool):
    """Open the inputs, join the process group under torchrun, train into `out_dir`; a run of `distill.runs`
    also copies its training curves out."""
    from pipeline.config import write_resolved
    from pipeline.data.index import DatasetIndex
    from pipeline.distill.config import reads_mined
    from pipeline.distill.run import run_distill
    from pipeline.store.features import open_store
    from pipeline.store.image_cache import open_image_cache
    from pipeline.store.mined import open_mined

    index = DatasetIndex.load(paths.index_dir)
    store = open_store(paths.features, expect_fingerprint=index.fingerprint, expect_dim=cfg.teacher_dim)
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    # the teacher's mined neighbours (kdpipe mine), checked against the store, only when a setting reads them
    mined = open_mined(paths.mined, store) if reads_mined(cfg, baseline) else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch
        import torch.distributed as dist

        from pipeline.devices import resolve_device

        # the backend of the device the run trains on, as extract does: NCCL carries CUDA tensors only, so a
        # `distill.device: cpu` run on a GPU machine needs gloo; and a rank without a GPU of its own gets one line
        device = resolve_device(cfg.device, "distill.device")  # auto / cuda: cuda:LOCAL_RANK
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        if is_main_process():
            # one file per run (distill-VARIANT-sSEED.yaml), each under the section name `distill`
            write_resolved(cfg, paths.resolved_config(f"distill-{run}" if run else "distill"), "distill")
        result = run_distill(
            cfg, index=index, store=store, cache=cache, out_dir=out_dir, baseline=baseline, resume=resume, mined=mined
        )
        finished = True
    finally:
        if distributed:
            if finished:
                # every rank past its last collective before any closes its connections: gloo aborts a rank
                # still reading from a peer that closed. Not after a failure: the other ranks may never come.
                dist.barrier(**({"device_ids": [device.index]} if device.type == "cuda" else {}))
            dist.destroy_process_group()
    if is_main_process() and run:
        copy_training_curves(out_dir, paths.training_curves(run))
    return result


def copy_training_curves(out_dir: Path, targets: dict[str, Path]) -> None:
    """train_log.csv / val_log.csv of a run to their own small uncached DVC output (a fresh clone has them for
    `dvc plots show` without pulling the model), each replaced whole."""
    from pipeline.store.durable import write_file_durably

    for log, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_durably(target, (out_dir / f"{log}_log.csv").read_bytes(), training_curve(log))


def training_curve(log: str):
    """What the copy of `log`_log.csv replaces: nothing, or an earlier copy (a CSV with the header of such a log)."""
    from pipeline.store.ownership import Output, text_with

    header = {"train": "step,epoch,lr,pairs_per_s,loss,", "val": "epoch,step,i2t_r1,"}[log]
    return Output(f"a copy of a {log}_log.csv", recognise=text_with(header, within=len(header)))
