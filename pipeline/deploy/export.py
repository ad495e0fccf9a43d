"""`kdpipe export`: a deployable student directory: the student's files, its model card (README.md), and on
request the transformers copy (`hf/`), the open_clip model (`open_clip/`), the sentence-transformers text side
(`sentence_transformers/`) and the ONNX encoders (`onnx/`). Each computes kdpipe's embeddings (checked here
where the library imports; open_clip is checked by the tests' reference loader), or is refused in one line.

By default (stages/export.py) it is a new directory, <workdir>/export/<student>: the student directory itself is
an output of `dvc repro`'s distill stage, and files written into it would make DVC see that output modified and
train it again. The student's files are hard-linked into it where the filesystem allows (no bytes copied: kdpipe
replaces files by rename, never in place, so a link never sees a later change), copied elsewhere; its training
state (`checkpoints/`) is left out. The whole directory is swapped in at once (durable.atomic_dir), so an export
never mixes files of two runs, and only over an earlier export (it lists its files: a directory holding anything
else, the work directory or a folder of the user's, is refused). With the student directory as the output,
everything is written in place (each of README.md, hf/, open_clip/, sentence_transformers/ and onnx/ replaces
only an earlier one of its kind)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy.card import MODEL_CARD, CardInfo, model_card
from pipeline.deploy.pixels import StudentPixels, student_pixels
from pipeline.deploy.scale import training_logit_scale
from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir, link_or_copy, write_text_durably
from pipeline.store.features import read_attrs
from pipeline.store.ownership import Output, claim
from pipeline.towers import quiet_transformers
from pipeline.towers.student import load_student

log = logging.getLogger(__name__)
_NOT_EXPORTED = {"checkpoints"}  # training state: what resuming needs, not what serving needs
EXPORT = Output("a student export", directory=True, marker=True)  # what an export replaces: an earlier export


@dataclass(frozen=True)
class ExportRequest:
    """What `kdpipe export` writes beside the student's files, and the work directory's files it reads."""

    hf: bool = False
    onnx: bool = False
    open_clip: bool = False
    sentence: bool = False  # sentence-transformers, the text side
    features: Path | None = None  # the teacher's feature store: the card's teacher and dataset
    metrics: Path | None = None  # evaluate's metrics_detail.json (its whole record: seed means, each seed's figures)
    images: Path | None = None  # prepare's image cache: how the student's pixels were made


def run_export(student_dir: Path, out_dir: Path | None, request: ExportRequest) -> list[str]:
    """Write what was asked for into `out_dir` (default: in place, the student directory); one line per thing."""
    if out_dir is None or out_dir.resolve() == student_dir.resolve():
        return _write_exports(student_dir, student_dir, request)
    if student_dir.resolve() in out_dir.resolve().parents:
        raise InputError(f"{out_dir}: inside the student directory {student_dir}; export to a directory outside it")
    load_student(student_dir)  # not a student: one line, before anything is written
    with atomic_dir(out_dir, EXPORT) as tmp:
        _link_student(student_dir, tmp)
        lines = _write_exports(tmp, out_dir, request)
    return [f"{out_dir}: the student's files from {student_dir} (without checkpoints/)", *lines]


def _link_student(student_dir: Path, out: Path) -> None:
    def left_out(directory: str, names: list[str]) -> set[str]:
        return _NOT_EXPORTED & set(names) if Path(directory) == student_dir else set()

    shutil.copytree(student_dir, out, ignore=left_out, copy_function=link_or_copy, dirs_exist_ok=True)


def _write_exports(directory: Path, shown: Path, request: ExportRequest) -> list[str]:
    """hf/, open_clip/, sentence_transformers/, onnx/ and README.md into `directory` (named `shown` in the lines
    returned). Each format is checked against kdpipe's own embeddings where its library is importable."""
    model = load_student(directory)
    for name, kind in _outputs(request).items():  # all first: in place, a foreign one must not stop a half-done export
        claim(directory / name, kind)
    done, info = [], CardInfo()
    if request.hf or request.open_clip:
        info.scale = training_logit_scale(directory)
        info.pixels = _pixels(model, request.images, "export --hf" if request.hf else "export --open-clip")
    if request.hf:
        from pipeline.deploy.hf import save_dual_encoder

        save_dual_encoder(model, directory / "hf", info.pixels, info.scale)
        err = hf_max_error(model, directory / "hf")
        done.append(
            f"{shown / 'hf'}: VisionTextDualEncoderModel, logit scale 1/{info.scale.temperature:g} "
            f"(max |transformers - kdpipe| {err:.1e})"
        )
        _check(err, EXACT, shown / "hf")
    if request.open_clip:
        from pipeline.deploy.openclip import save_open_clip

        save_open_clip(model, directory / "open_clip", info.pixels, info.scale, final=shown / "open_clip")
        done.append(
            f"{shown / 'open_clip'}: open_clip_config.json + open_clip_model.safetensors "
            f"(open_clip.create_model_and_transforms('local-dir:{(shown / 'open_clip').resolve()}'))"
        )
    if request.sentence:
        from pipeline.deploy.sentence import max_error, save_sentence_transformer

        save_sentence_transformer(model, directory / "sentence_transformers", directory / "text_tower")
        err = max_error(model, directory / "sentence_transformers", CHECK_TEXTS)
        done.append(
            f"{shown / 'sentence_transformers'}: the text side (max |sentence-transformers - kdpipe| {err:.1e})"
        )
        _check(err, EXACT, shown / "sentence_transformers")
    if request.onnx:
        from pipeline.deploy.onnx import OnnxEncoders, export_onnx

        export_onnx(model, directory / "onnx")
        err = onnx_max_error(model, OnnxEncoders(directory / "onnx"))
        done.append(f"{shown / 'onnx'}: image.onnx, text.onnx (max |onnxruntime - torch| {err:.1e})")
        _check(err, 1e-4, shown / "onnx")
    attrs = None
    if request.features is not None:
        attrs = read_attrs(request.features)
        if attrs is None:
            log.info("export: %s is not a feature store; the model card names no teacher", request.features)
    metrics = request.metrics if request.metrics is not None and request.metrics.is_file() else None
    card = model_card(directory, store_attrs=attrs, metrics_path=metrics, info=info, shown=shown)
    write_text_durably(directory / "README.md", card, MODEL_CARD)
    done.append(f"{shown / 'README.md'}: model card")
    return done


def _outputs(request: ExportRequest) -> dict[str, Output]:
    """What `_write_exports` writes into the directory, by name, with the kind of output each may replace."""
    from pipeline.deploy.hf import HF_COPY
    from pipeline.deploy.onnx import ONNX_DIR
    from pipeline.deploy.openclip import OPEN_CLIP_DIR
    from pipeline.deploy.sentence import SENTENCE_DIR

    kinds = {
        "hf": (request.hf, HF_COPY),
        "open_clip": (request.open_clip, OPEN_CLIP_DIR),
        "sentence_transformers": (request.sentence, SENTENCE_DIR),
        "onnx": (request.onnx, ONNX_DIR),
    }
    return {"README.md": MODEL_CARD, **{name: kind for name, (asked, kind) in kinds.items() if asked}}


EXACT = 1e-5  # fp32, the same operations in another library: anything above is a mapping error, not rounding
CHECK_TEXTS = ["a photo of a dog", "two people on a beach at sunset", "x"]


def _check(err: float, bound: float, where: Path) -> None:
    if not err <= bound:  # NaN too
        raise InputError(f"{where}: the exported model differs from kdpipe's embeddings by {err:.1e} (> {bound:g})")


def _pixels(model, images: Path | None, what: str) -> StudentPixels:
    """The student's pixel recipe from the work directory's image cache (prepare's `resize` attrs)."""
    attrs = read_attrs(images) if images is not None else None
    return student_pixels(attrs, str(images), model.image_size, model.image_tower.mean, model.image_tower.std, what)


@torch.inference_mode()
def hf_max_error(model, directory: Path, n: int = 3) -> float:
    """Largest |transformers - kdpipe| over image and text embeddings, the saved directory reloaded with
    transformers' stock calls (get_image_features / get_text_features, no kdpipe code)."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    with quiet_transformers():
        dual = VisionTextDualEncoderModel.from_pretrained(directory, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    s = model.image_size
    images = np.random.default_rng(0).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    pixels = model.normalize_pixels(model.to_float(images))
    theirs_i = F.normalize(dual.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    t = tok(CHECK_TEXTS[:n], padding=True, truncation=True, return_tensors="pt")
    theirs_t = F.normalize(
        dual.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output, dim=-1
    )
    ours_i, ours_t = model.encode_pixels(pixels), model.encode_texts(CHECK_TEXTS[:n])
    return float(max((ours_i - theirs_i).abs().max(), (ours_t - theirs_t).abs().max()))


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
