"""`kdpipe fit-cross-encoder`: train the demo's cross-encoder, a fusion head over the LiT teacher's frozen towers and
its fitted heads (fit_cross_encoder.heads), on fit_teacher's training pairs (train split only).

Writes `<workdir>/cross_encoder/cross_encoder.safetensors` (the file a `mine.cross_encoder.fusion.head` names, as
ablation/params.yaml's does; its sha256 goes into the mined store's attrs) and `fit_summary.json`. A stage of
ablation/dvc.yaml.
"""

from __future__ import annotations

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
    out: Path = typer.Option(None, "--out", help="Output directory (default: <workdir>/cross_encoder)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto (the backbone pass; the head trains on it)."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Fit the demo's cross-encoder on the teacher's training pairs, on top of its heads, deterministically."""
    from pipeline.devices import resolve_device
    from pipeline.teachers.fit_fusion import FitCrossEncoderConfig, run_fit_cross_encoder
    from pipeline.teachers.fit_teacher import FitTeacherConfig

    cfg, paths = load_stage(params, "fit_cross_encoder", FitCrossEncoderConfig, set_, workdir)
    teacher, _ = load_stage(params, "fit_teacher", FitTeacherConfig, set_, workdir)
    out = out or paths.cross_encoder
    with writing(out, no_wait=no_wait):
        result = run_fit_cross_encoder(cfg, teacher, out, resolve_device(device, "--device"))
        save_resolved(cfg, paths, "fit_cross_encoder")
    echo(result.summary())
