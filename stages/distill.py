"""`kdpipe distill`: train the student against the stored teacher features (section `distill`).

Reads the dataset index, prepare's image cache and extract's feature store from the work directory,
refuses any of them that belongs to another index (fingerprint) or is incomplete, and writes the student
into `<workdir>/student/` (with `--baseline`: the undistilled baseline, trained with `distill.baseline_loss`
on the pairs alone, into `<workdir>/baseline/`), its training state into `<workdir>/checkpoints/<name>/`
(resumed by default when it is this run's; removed once the run completes). Validation ranks as evaluate does
(`evaluate.gallery`). With `--variant NAME --seed S`: one run of `distill.runs`
(pipeline/runs.py), the variant's settings merged into the section, into `<workdir>/models/NAME-sS/`,
its training logs also copied to `<workdir>/curves/{train,val}/NAME-sS.csv` (small, uncached: `dvc plots`).
With `--ablation FILE` (and `--variant NAME --seed S`): one run of that ablation (pipeline/runs.py:
the base variant of distill.runs plus NAME's overrides), from the same data into the ablation's own work
directory (`<ablation.workdir>/models/NAME-sS/`, its curves and resolved config there too).
With `--all` (dvc.yaml's distill stage): every run of distill.runs, or of the ablation, each in a process of its
own, several at once where the CPUs allow (stages/_all_runs.py).
Under torchrun every process runs this same command (one run: `--all` starts processes of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.paths import ArtifactPaths
from stages._ablation import ABLATION_OPTION, load_ablation
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
    all_runs: bool = typer.Option(
        False,
        "--all",
        help="Train every run of distill.runs (or of --ablation), each in a process of its own, runtime.jobs at "
        "once (null: as many as the CPUs hold).",
    ),
    ablation: Path = ABLATION_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Train the student (or the baseline) from the feature store; export the best epoch on val."""
    from pipeline.config import from_dict
    from pipeline.distill.config import DistillConfig
    from pipeline.errors import ConfigError
    from pipeline.runs import ablation_section, run_name, split_runs, variant_section

    raw = load_raw(params, set_)
    paths = artifact_paths(raw, params, workdir)
    if all_runs:
        train_all(
            raw,
            paths,
            params,
            set_,
            workdir,
            ablation,
            resume,
            no_wait,
            variant is not None or seed is not None or baseline,
        )
        return
    out_paths, run = paths, None  # where the run goes: an ablation's runs go to its own work directory
    mined = paths.mined  # the mined store a run reads (when it reads one): an ablation may mine its own
    views = paths.views  # the views store a run reads (distill.teacher_views): an ablation's are its own
    features = paths.features  # the feature store: an ablation may extract its own (ablation.extract)
    if variant is None and seed is None and ablation is None:  # the single student (or --baseline) without runs
        section = split_runs(raw.get("distill"))[1]
    elif variant is None or seed is None or baseline:
        raise ConfigError("--variant and --seed go together, and a variant says itself whether it is a baseline")
    elif ablation is not None:
        abl = load_ablation(ablation)
        section, out_paths = ablation_section(raw.get("distill"), abl, variant, seed), ArtifactPaths(abl.workdir)
        run = run_name(variant, seed)
        mined = out_paths.mined if abl.mine else mined
        views = out_paths.views
        features = out_paths.features if abl.extract else features
    else:
        section, baseline = variant_section(raw.get("distill"), variant, seed)
        run = run_name(variant, seed)
    cfg = from_dict(DistillConfig, section, "distill")
    gallery = validation_gallery(raw)
    apply_runtime(raw, cfg.num_workers)
    verify_if_asked(raw, features)
    name = run or ("baseline" if baseline else "student")
    out_dir = out_paths.model(run) if run else paths.workdir / name
    if run:  # before hours of training: the copies of its curves must be able to go where they go
        from pipeline.store.ownership import claim

        for log, target in out_paths.training_curves(run).items():
            claim(target, training_curve(log))
    # rank 0 locks before joining the process group: the other ranks wait in the rendezvous meanwhile
    with writing(out_dir, no_wait=no_wait):
        result = train(
            cfg,
            paths,
            out_dir,
            run=run,
            baseline=baseline,
            resume=resume,
            gallery=gallery,
            out_paths=out_paths,
            mined_path=mined,
            views_path=views,
            features_path=features,
        )
    if is_main_process():
        best = f", best val RSUM {result.best_rsum:.2f} at epoch {result.best_epoch}" if result.best_epoch > 0 else ""
        echo(f"distill: {result.epochs_done} epochs, {result.global_step} steps{best}; student in {out_dir}")


def train_all(raw, paths, params, set_, workdir, ablation, resume, no_wait, one_run: bool) -> None:
    """`--all`: every run, several processes at once (stages/_all_runs.py)."""
    from pipeline.runs import ablation_section, run_name, variant_section
    from stages._all_runs import child_args, jobs_for, planned_runs, remove_other_runs, run_all

    if one_run:
        from pipeline.errors import ConfigError

        raise ConfigError("--all trains every run: leave out --variant, --seed and --baseline")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.errors import ConfigError

        raise ConfigError("--all starts a process per run: under torchrun, train one run (--variant, --seed)")
    abl = load_ablation(ablation) if ablation is not None else None
    runs = planned_runs(raw, abl)
    if abl is not None:
        sections = [ablation_section(raw.get("distill"), abl, v, s) for v, s in runs]
        out = ArtifactPaths(abl.workdir)
    else:
        sections = [variant_section(raw.get("distill"), v, s)[0] for v, s in runs]
        out = paths
    names = [run_name(v, s) for v, s in runs]
    jobs = jobs_for(raw, sections, len(runs))
    remove_other_runs(out, names)
    echo(f"distill: {len(runs)} runs, {jobs} at once, into {out.workdir / 'models'}")
    run_all(runs, child_args(params, set_, workdir, ablation, resume, no_wait), jobs, names)
    echo(f"distill: {len(runs)} runs complete in {out.workdir / 'models'}")


def validation_gallery(raw: dict) -> str:
    """evaluate.gallery (checked with its section): distill validates the way evaluate measures."""
    from pipeline.config import from_dict
    from pipeline.evaluate.config import EvaluateConfig

    return from_dict(EvaluateConfig, raw.get("evaluate"), "evaluate").gallery


def train(
    cfg,
    paths: ArtifactPaths,
    out_dir: Path,
    *,
    run: str | None,
    baseline: bool,
    resume: bool,
    gallery: str,
    out_paths: ArtifactPaths | None = None,
    mined_path: Path | None = None,
    views_path: Path | None = None,
    features_path: Path | None = None,
):
    """Open the inputs (under `paths`; the feature, mined and views stores at `features_path`, `mined_path` and
    `views_path`, default <workdir>/features.zarr, mined.zarr and views.zarr), join the
    process group under torchrun, train into `out_dir` (the training state in <out workdir>/checkpoints/<run>/); a
    run of `distill.runs` (or of an ablation) also copies its training curves out (under `out_paths`, default
    `paths`)."""
    out_paths = out_paths or paths
    from pipeline.config import write_resolved
    from pipeline.data.index import DatasetIndex
    from pipeline.distill.config import reads_mined
    from pipeline.distill.run import run_distill
    from pipeline.store.features import open_store
    from pipeline.store.image_cache import open_image_cache
    from pipeline.store.mined import open_mined

    index = DatasetIndex.load(paths.index_dir)
    store = open_store(
        features_path or paths.features, expect_fingerprint=index.fingerprint, expect_dim=cfg.teacher_dim
    )
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    # the teacher's mined neighbours (kdpipe mine), checked against the store, only when a setting reads them
    mined = open_mined(mined_path or paths.mined, store) if reads_mined(cfg, baseline) else None
    views = None
    if cfg.teacher_views:  # the teacher's views of the training images (kdpipe views); the baseline crops alike
        from pipeline.data.pixels import PixelRecipe
        from pipeline.store.views import open_views

        recipe = PixelRecipe.of_cache(cache.attrs, str(paths.images))
        views = open_views(views_path or paths.views, store, cfg.train_split, recipe)
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
            write_resolved(cfg, out_paths.resolved_config(f"distill-{run}" if run else "distill"), "distill")
        result = run_distill(
            cfg,
            index=index,
            store=store,
            cache=cache,
            out_dir=out_dir,
            ckpt_dir=out_paths.checkpoints(run or out_dir.name),
            baseline=baseline,
            resume=resume,
            val_gallery=gallery,
            cache_dir=paths.text_features,
            mined=mined,
            views=views,
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
        copy_training_curves(out_dir, out_paths.training_curves(run))
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

    # train_log.csv had a pairs_per_s column until timings moved out of the DVC outputs (checkpoints/<run>/speed.csv)
    headers = {"train": ("step,epoch,lr,loss,", "step,epoch,lr,pairs_per_s,loss,"), "val": ("epoch,step,i2t_r1,",)}
    checks = [text_with(h, within=len(h)) for h in headers[log]]
    return Output(f"a copy of a {log}_log.csv", recognise=lambda path: any(check(path) for check in checks))
