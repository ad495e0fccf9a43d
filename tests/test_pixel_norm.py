"""`distill.student.image.pixel_norm`: `half` / `imagenet` by name, or `auto` = the tower's own preprocessing config,
checked against transformers' own ViT image processor reading the same model dir."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_student import DIM, images, tiny_cfg

from pipeline.config import from_dict
from pipeline.errors import ConfigError
from pipeline.towers.image import ImageTowerConfig
from pipeline.towers.student import build_student, load_student, save_student

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet statistics, typed here


def vit_dir(tmp_path, tokenizer_dir, mean_std=None):
    """A tiny local ViT in Hugging Face format, with a preprocessor_config.json when `mean_std` is given."""
    cfg = tiny_cfg(tokenizer_dir)
    torch.manual_seed(0)
    build_student(cfg, DIM).image_tower.model.save_pretrained(tmp_path)
    if mean_std is not None:
        (tmp_path / "preprocessor_config.json").write_text(
            json.dumps(
                {"image_processor_type": "ViTImageProcessor", "image_mean": mean_std[0], "image_std": mean_std[1]}
            )
        )
    return replace(cfg, image=replace(cfg.image, path=tmp_path))


def resolved(cfg):
    tower = build_student(cfg, DIM).image_tower
    return tower.mean, tower.std


@pytest.mark.parametrize("name,expected", [("half", HALF), ("imagenet", IMAGENET)])
def test_named_pixel_norms(tokenizer_dir, name, expected):
    cfg = tiny_cfg(tokenizer_dir, pixel_norm=name)
    assert resolved(cfg) == expected
    model = build_student(cfg, DIM).eval()
    x = images(2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in expected)
    manual = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(model.normalize_pixels(model.to_float(x)), manual, rtol=0, atol=1e-6)


def test_auto_reads_the_model_dirs_preprocessor_config(tokenizer_dir, tmp_path):
    from transformers import ViTImageProcessorPil

    assert resolved(tiny_cfg(tokenizer_dir)) == HALF  # random init: no config of its own, the in21k ViTs' half
    assert resolved(vit_dir(tmp_path / "bare", tokenizer_dir)) == HALF  # a dir without preprocessor_config.json
    cfg = vit_dir(tmp_path / "imagenet", tokenizer_dir, IMAGENET)
    assert resolved(cfg) == IMAGENET  # auto: what the weights' own preprocessing says
    assert resolved(replace(cfg, image=replace(cfg.image, pixel_norm="half"))) == HALF  # a name overrides it
    # the same pixels as transformers' own processor reading that dir (no resize: the cache is at size)
    model = build_student(cfg, DIM).eval()
    x = images(2)
    processor = ViTImageProcessorPil.from_pretrained(tmp_path / "imagenet")
    ref = processor(list(x.numpy()), do_resize=False, return_tensors="pt").pixel_values
    torch.testing.assert_close(model.normalize_pixels(model.to_float(x)), ref, rtol=0, atol=1e-5)


def test_the_resolved_norm_travels_with_the_student(tokenizer_dir, tmp_path):
    model = build_student(tiny_cfg(tokenizer_dir, pixel_norm="imagenet"), DIM).eval()
    save_student(model, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "student_config.json").read_text())
    assert (tuple(meta["image"]["mean"]), tuple(meta["image"]["std"])) == IMAGENET
    assert meta["config"]["image"]["pixel_norm"] == "imagenet"
    loaded = load_student(tmp_path / "s")
    assert (loaded.image_tower.mean, loaded.image_tower.std) == IMAGENET
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(x), model.encode_images(x))


def test_efficientnet_lite0_auto_is_its_packaged_constants(tokenizer_dir):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra efficientnet-lite-pytorch is not installed")
    from pipeline import pretrained_assets as assets

    cfg = replace(tiny_cfg(tokenizer_dir), image=ImageTowerConfig(backend="efficientnet_lite0", pretrained=False))
    own = (tuple(assets.EFFICIENTNET_LITE0_MEAN), tuple(assets.EFFICIENTNET_LITE0_STD))
    assert resolved(cfg) == own
    assert resolved(replace(cfg, image=replace(cfg.image, pixel_norm="imagenet"))) == IMAGENET


def test_pixel_norm_config_is_checked():
    assert from_dict(ImageTowerConfig, {}, "distill.student.image").pixel_norm == "auto"
    with pytest.raises(ConfigError, match="distill.student.image.pixel_norm"):
        from_dict(ImageTowerConfig, {"pixel_norm": "clip"}, "distill.student.image")
    with pytest.raises(ConfigError, match="give one of the two"):
        from_dict(ImageTowerConfig, {"pixel_norm": "imagenet", "mean": [0.5, 0.5, 0.5]}, "distill.student.image")
    # explicit constants alone still work
    cfg = from_dict(ImageTowerConfig, {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}, "distill.student.image")
    assert (cfg.pixel_norm, cfg.mean) == ("auto", (0.1, 0.2, 0.3))
