"""`kdpipe export`: the student's model card (README.md), plus a transformers copy (--hf) and ONNX encoders (--onnx).

kdpipe export --hf --onnx            # into <workdir>/student/{README.md, hf/, onnx/}
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.deploy.export import run_export
from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, run_stage, writing
from stages._deploy import STUDENT_OPTION, artifact_paths


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    hf: bool = typer.Option(False, "--hf", help="Also write hf/: a stock transformers VisionTextDualEncoderModel."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write onnx/: image.onnx and text.onnx (needs kdpipe[onnx])."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Make the student usable without kdpipe: model card, transformers copy, ONNX encoders."""
    paths = artifact_paths(params, workdir)
    student = student or paths.student
    with writing(student, no_wait=no_wait):  # distill writes there too: an export waits for the training
        lines = run_export(student, hf=hf, onnx=onnx, features=paths.features, metrics=paths.metrics)
    for line in lines:
        echo(f"export: {line}")
