"""`kdpipe export`: a deployable student directory: the student's files, its model card (README.md), and on
request the transformers copy (`hf/`) and the ONNX encoders (`onnx/`).

By default (stages/export.py) it is a new directory, <workdir>/export/<student>: the student directory itself is
an output of `dvc repro`'s distill stage, and files written into it would make DVC see that output modified and
train it again. The student's files are hard-linked into it where the filesystem allows (no bytes copied: kdpipe
replaces files by rename, never in place, so a link never sees a later change), copied elsewhere; its training
state (`checkpoints/`) is left out. The whole directory is swapped in at once (durable.atomic_dir), so an export
never mixes files of two runs. With the student directory as the output, everything is written in place."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy.card import model_card
from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir, write_text_durably
from pipeline.towers.student import load_student

log = logging.getLogger(__name__)
_NOT_EXPORTED = {"checkpoints"}  # training state: what resuming needs, not what serving needs


def run_export(
    student_dir: Path,
    out_dir: Path | None = None,
    *,
    hf: bool,
    onnx: bool,
    features: Path | None = None,
    metrics: Path | None = None,
) -> list[str]:
    """Write what was asked for into `out_dir` (default: in place, the student directory); one line per thing."""
    if out_dir is None or out_dir.resolve() == student_dir.resolve():
        return _write_exports(student_dir, student_dir, hf=hf, onnx=onnx, features=features, metrics=metrics)
    load_student(student_dir)  # not a student: one line, before anything is written
    with atomic_dir(out_dir) as tmp:
        _link_student(student_dir, tmp)
        lines = _write_exports(tmp, out_dir, hf=hf, onnx=onnx, features=features, metrics=metrics)
    return [f"{out_dir}: the student's files from {student_dir} (without checkpoints/)", *lines]


def _link_student(student_dir: Path, out: Path) -> None:
    def left_out(directory: str, names: list[str]) -> set[str]:
        return _NOT_EXPORTED & set(names) if Path(directory) == student_dir else set()

    shutil.copytree(student_dir, out, ignore=left_out, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _write_exports(
    directory: Path, shown: Path, *, hf: bool, onnx: bool, features: Path | None, metrics: Path | None
) -> list[str]:
    """hf/, onnx/ and README.md into `directory` (named `shown` in the lines returned)."""
    model = load_student(directory)
    done = []
    if hf:
        from pipeline.deploy.hf import save_dual_encoder, text_bias_is_zero

        save_dual_encoder(model, directory / "hf")
        note = "" if text_bias_is_zero(model) else " (add config.kdpipe_text_projection_bias to text features)"
        done.append(f"{shown / 'hf'}: VisionTextDualEncoderModel{note}")
    if onnx:
        from pipeline.deploy.onnx import OnnxEncoders, export_onnx

        export_onnx(model, directory / "onnx")
        err = onnx_max_error(model, OnnxEncoders(directory / "onnx"))
        done.append(f"{shown / 'onnx'}: image.onnx, text.onnx (max |onnxruntime - torch| {err:.1e})")
        if err > 1e-4:
            raise InputError(f"{shown / 'onnx'}: onnxruntime differs from torch by {err:.1e} (> 1e-4)")
    attrs = None
    if features is not None:
        from pipeline.store.features import read_attrs

        attrs = read_attrs(features)
        if attrs is None:
            log.info("export: %s is not a feature store; the model card names no teacher", features)
    card = model_card(
        directory,
        store_attrs=attrs,
        metrics_path=metrics if metrics is not None and metrics.is_file() else None,
        hf=(directory / "hf" / "config.json").is_file(),
        onnx=(directory / "onnx" / "image.onnx").is_file(),
    )
    write_text_durably(directory / "README.md", card)
    done.append(f"{shown / 'README.md'}: model card")
    return done


@torch.inference_mode()
def onnx_max_error(model, encoders, n: int = 3) -> float:
    """Largest absolute difference between the ONNX and torch embeddings on a few fixed inputs."""
    s = model.image_size
    images = np.random.default_rng(0).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    tokens = model.tokenize(["a photo of a dog", "two people on a beach at sunset", "x"][:n])
    ref_i = model.encode_images(images).cpu().numpy()
    ref_t = model.encode_tokens(tokens).cpu().numpy()
    got_i = encoders.images(images)
    got_t = encoders.tokens(tokens["input_ids"].numpy(), tokens["attention_mask"].numpy())
    return float(max(np.abs(ref_i - got_i).max(), np.abs(ref_t - got_t).max()))
