"""`kdpipe fit-teacher`: train the LiT demo teacher's linear heads (frozen EfficientNet-Lite + MiniLM).

Writes `<workdir>/teacher/heads.safetensors` (the file `extract.teacher.lit.heads` names; its sha256 goes
into the feature store's teacher attrs) and `fit_summary.json`.
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
    out: Path = typer.Option(None, "--out", help="Output directory (default: <workdir>/teacher)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto (the backbone pass; heads train on it too)."),
    ablation: Path = typer.Option(
        None,
        "--ablation",
        help="An ablation's params file (e.g. ablation/params.yaml): fit with its `fit_teacher` keys merged into "
        "this file's, into its work directory's teacher/ (a teacher of its own, e.g. a second one).",
    ),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Fit the demo teacher's two linear heads on its training pairs (train split only), deterministically."""
    from pipeline.devices import resolve_device
    from pipeline.teachers.fit_teacher import FitTeacherConfig, run_fit_teacher

    cfg, paths = load_stage(params, "fit_teacher", FitTeacherConfig, set_, workdir)
    if ablation is not None:  # the data is this file's; the settings and the output the ablation's
        cfg, abl_paths = ablation_stage(params, set_, ablation, "fit_teacher", FitTeacherConfig)
        out = out or abl_paths.teacher
    out = out or paths.teacher
    with writing(out, no_wait=no_wait):
        result = run_fit_teacher(cfg, out, resolve_device(device, "--device"))
        save_resolved(cfg, paths, "fit_teacher")
    echo(result.summary())
