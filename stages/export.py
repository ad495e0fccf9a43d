"""`kdpipe export`: a deployable copy of the student with its model card (README.md), plus a transformers copy
(--hf), an open_clip model (--open-clip), the text side for sentence-transformers (--sentence-transformers)
and ONNX encoders (--onnx).

kdpipe export --open-clip --onnx     # into <workdir>/export/<student>/{README.md, open_clip/, onnx/, the student's files}
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, run_stage, writing
from stages._deploy import STUDENT_OPTION, artifact_paths, default_student


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    hf: bool = typer.Option(False, "--hf", help="Also write hf/: a stock transformers VisionTextDualEncoderModel."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write onnx/: image.onnx and text.onnx (needs kdpipe[onnx])."),
    open_clip: bool = typer.Option(
        False, "--open-clip", help="Also write open_clip/: a model directory open_clip loads ('local-dir:DIR')."
    ),
    sentence: bool = typer.Option(
        False,
        "--sentence-transformers",
        help="Also write sentence_transformers/: the text side, for SentenceTransformer.",
    ),
    out: Path = typer.Option(
        None,
        "--out",
        help="Directory to write (default: <workdir>/export/<student>; the student directory itself: in place).",
    ),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Make the student usable without kdpipe: model card, transformers / open_clip / sentence-transformers copies,
    ONNX encoders; each computes kdpipe's embeddings, or is refused in one line."""
    from pipeline.deploy.export import ExportRequest, run_export

    paths = artifact_paths(params, workdir)
    student = student or default_student(params, paths)
    # not into the student directory by default: it is a DVC output, which DVC would then see modified
    out = out or paths.workdir / "export" / student.name
    with writing(student, out, no_wait=no_wait):  # distill writes the student: an export waits for the training
        request = ExportRequest(
            hf=hf,
            onnx=onnx,
            open_clip=open_clip,
            sentence=sentence,
            features=paths.features,
            metrics=paths.metrics_detail,
            images=paths.images,
        )
        lines = run_export(student, out, request)
    for line in lines:
        echo(f"export: {line}")
