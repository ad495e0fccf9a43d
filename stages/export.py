"""`kdpipe export`: a deployable copy of the student with its model card (README.md), plus a transformers copy
(--hf) and ONNX encoders (--onnx).

kdpipe export --hf --onnx            # into <workdir>/export/<student>/{README.md, hf/, onnx/, the student's files}
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.deploy.export import run_export
from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, run_stage, writing
from stages._deploy import STUDENT_OPTION, artifact_paths, default_student


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    hf: bool = typer.Option(False, "--hf", help="Also write hf/: a stock transformers VisionTextDualEncoderModel."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write onnx/: image.onnx and text.onnx (needs kdpipe[onnx])."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Directory to write (default: <workdir>/export/<student>; the student directory itself: in place).",
    ),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Make the student usable without kdpipe: model card, transformers copy, ONNX encoders."""
    paths = artifact_paths(params, workdir)
    student = student or default_student(params, paths)
    # not into the student directory by default: it is a DVC output, which DVC would then see modified
    out = out or paths.workdir / "export" / student.name
    with writing(student, out, no_wait=no_wait):  # distill writes the student: an export waits for the training
        lines = run_export(student, out, hf=hf, onnx=onnx, features=paths.features, metrics=paths.metrics_detail)
    for line in lines:
        echo(f"export: {line}")
