"""`kdpipe export`: the model card, and on request the transformers copy (`hf/`) and the ONNX encoders
(`onnx/`), all written into the student directory next to kdpipe's own files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy.card import model_card
from pipeline.errors import InputError
from pipeline.store.durable import write_text_durably
from pipeline.towers.student import load_student

log = logging.getLogger(__name__)


def run_export(
    student_dir: Path, *, hf: bool, onnx: bool, features: Path | None = None, metrics: Path | None = None
) -> list[str]:
    """Write what was asked for; returns one line per thing written."""
    model = load_student(student_dir)
    done = []
    if hf:
        from pipeline.deploy.hf import save_dual_encoder, text_bias_is_zero

        save_dual_encoder(model, student_dir / "hf")
        note = "" if text_bias_is_zero(model) else " (add config.kdpipe_text_projection_bias to text features)"
        done.append(f"{student_dir / 'hf'}: VisionTextDualEncoderModel{note}")
    if onnx:
        from pipeline.deploy.onnx import OnnxEncoders, export_onnx

        export_onnx(model, student_dir / "onnx")
        err = onnx_max_error(model, OnnxEncoders(student_dir / "onnx"))
        done.append(f"{student_dir / 'onnx'}: image.onnx, text.onnx (max |onnxruntime - torch| {err:.1e})")
        if err > 1e-4:
            raise InputError(f"{student_dir / 'onnx'}: onnxruntime differs from torch by {err:.1e} (> 1e-4)")
    attrs = None
    if features is not None:
        from pipeline.store.features import read_attrs

        attrs = read_attrs(features)
        if attrs is None:
            log.info("export: %s is not a feature store; the model card names no teacher", features)
    card = model_card(
        student_dir,
        store_attrs=attrs,
        metrics_path=metrics if metrics is not None and metrics.is_file() else None,
        hf=(student_dir / "hf" / "config.json").is_file(),
        onnx=(student_dir / "onnx" / "image.onnx").is_file(),
    )
    write_text_durably(student_dir / "README.md", card)
    done.append(f"{student_dir / 'README.md'}: model card")
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
