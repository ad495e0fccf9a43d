"""The student as an open_clip model directory: loaded by a reference loader written from open_clip's config
semantics (tests/open_clip_reference.py: open_clip itself cannot be imported here), it gives kdpipe's embeddings
and, from image files, kdpipe's pixels; what open_clip cannot compute exactly is refused in one line. Where
open_clip imports, the last test loads the same files with it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import DIM, SIZE, tiny_student, tiny_student_config
from open_clip_reference import ReferenceOpenClip
from PIL import Image

from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.deploy.openclip import save_open_clip
from pipeline.deploy.pixels import student_pixels
from pipeline.deploy.scale import LogitScale
from pipeline.errors import InputError
from pipeline.towers.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["A dog runs", "the cat sits on a man in red", "photo", "dog " * 30, "  a  red   dog "]


def pixels_of(model, mode="squash", resize=SIZE, filter="bilinear"):
    rc = ResizeConfig(mode=mode, resize=resize, crop=SIZE, filter=filter)
    return student_pixels({"resize": rc.describe()}, "cache", SIZE, model.image_tower.mean, model.image_tower.std, "t")


def export(model, tmp_path: Path, **pixels) -> Path:
    return save_open_clip(model, tmp_path / "open_clip", pixels_of(model, **pixels), LogitScale(0.05, "test"))


def assert_same_embeddings(model, ref) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = model.normalize_pixels(model.to_float(images))  # the same pixels for both: the models compared
        torch.testing.assert_close(ref.encode_image(pixels), model.encode_pixels(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(ref.encode_text(ref.tokenize(TEXTS)), model.encode_texts(TEXTS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("image_pooling,text_pooling", [("cls", "pooler"), ("mean", "mean"), ("mean", "cls")])
def test_open_clip_directory_gives_kdpipe_embeddings(tokenizer_dir, tmp_path, image_pooling, text_pooling):
    model = tiny_student(tokenizer_dir, seed=1, image_pooling=image_pooling, pooling=text_pooling)
    out = export(model, tmp_path)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["pool_type"] == {"cls": "tok", "mean": "avg"}[image_pooling]
    assert cfg["model_cfg"]["vision_cfg"]["norm_kwargs"] == {"eps": 1e-12}  # ViT's, not torch's 1e-5
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
    ref = ReferenceOpenClip(out)
    assert_same_embeddings(model, ref)
    assert abs(float(ref.logit_scale.detach().exp()) - 20.0) < 1e-4  # 1 / T


def test_a_vit_run_at_another_resolution_keeps_its_interpolated_positions(tokenizer_dir, tmp_path):
    """A pretrained ViT (24 px, 3x3 patches) in a 16 px student: transformers interpolates its positions on every
    call; the export stores the interpolated ones (with the patch bias folded in)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=24,
                  patch_size=8),
        add_pooling_layer=False,
    )  # fmt: skip
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vit.save_pretrained(tmp_path / "vit")
    cfg = tiny_student_config(tokenizer_dir, image_pooling="mean", pooling="mean")
    cfg = replace(cfg, image=replace(cfg.image, path=tmp_path / "vit"))
    torch.manual_seed(0)
    model = build_student(cfg, DIM).eval()
    assert model.image_tower.interpolate
    assert_same_embeddings(model, ReferenceOpenClip(export(model, tmp_path)))


@pytest.mark.parametrize("mode,resize", [("squash", SIZE), ("shorter_side_center_crop", SIZE)])
def test_open_clip_preprocessing_makes_kdpipes_pixels(tokenizer_dir, tmp_path, mode, resize):
    model = tiny_student(tokenizer_dir, seed=0)
    ref = ReferenceOpenClip(export(model, tmp_path, mode=mode, resize=resize))
    # JPEGs fully decoded (prepare's draft: false; DCT-scaled decoding is the documented difference)
    rc = ResizeConfig(mode=mode, resize=resize, crop=SIZE, draft=False)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 32), (32, 51), (40, 40), (33, 47), (50, 32)]):  # RGB files: exact
        path = tmp_path / f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        ours = model.normalize_pixels(model.to_float(decode_image(path, rc)[None].copy()))[0]
        torch.testing.assert_close(ref.preprocess(Image.open(path)), ours, rtol=0, atol=1e-6)


def test_what_open_clip_cannot_compute_is_refused_in_one_line(tokenizer_dir, tmp_path):
    cases = [
        (tiny_student(tokenizer_dir, seed=0, biases=("image",)), {}, "a bias in the image projection"),
        (tiny_student(tokenizer_dir, seed=0, biases=("text",)), {}, "a bias in the text projection"),
        (tiny_student(tokenizer_dir, seed=0), {"filter": "lanczos"}, "bilinear or bicubic only"),
        (tiny_student(tokenizer_dir, seed=0), {"mode": "shorter_side_center_crop", "resize": 24}, "resized to 24"),
    ]
    for model, pixels, message in cases:
        with pytest.raises(InputError, match=message):
            export(model, tmp_path, **pixels)
        assert not (tmp_path / "open_clip").exists()


def test_a_text_tower_open_clip_has_no_adapter_for_is_refused(tokenizer_dir, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=20, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(
        tmp_path / "distilbert"
    )
    cfg = tiny_student_config(tokenizer_dir, pooling="mean")
    cfg = replace(cfg, text=replace(cfg.text, path=tmp_path / "distilbert"))
    model = build_student(cfg, DIM).eval()
    with pytest.raises(InputError, match="text tower distilbert"):
        export(model, tmp_path)


def test_open_clip_itself_loads_the_directory(tokenizer_dir, tmp_path):
    """The real thing, where open_clip imports (not on the CPU machines: it needs torchvision)."""
    open_clip = pytest.importorskip("open_clip")
    model = tiny_student(tokenizer_dir, seed=1, image_pooling="mean", pooling="mean")
    out = export(model, tmp_path)
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    oc.eval()
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(a)) for a in images])
        torch.testing.assert_close(oc.encode_image(pixels, normalize=True), model.encode_images(images), atol=1e-5,
                                   rtol=0)  # fmt: skip
        theirs = oc.encode_text(tokenizer(TEXTS[:4]), normalize=True)
        torch.testing.assert_close(theirs, model.encode_texts(TEXTS[:4]), rtol=0, atol=1e-5)
        ref = ReferenceOpenClip(out)  # and the reference loader agrees with open_clip
        torch.testing.assert_close(ref.encode_image(pixels), oc.encode_image(pixels, normalize=True), rtol=0,
                                   atol=1e-6)  # fmt: skip
