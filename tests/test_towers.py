"""Towers by name: any transformers text encoder (AutoModel's), CLIP / SigLIP / DINOv2 image towers, a whole
small CLIP for both towers, Hub ids from the local Hugging Face cache; one line for anything unsupported.
Every model is a tiny config built offline; each tower is checked against the model's own forward, pooled by
hand, and survives save_student / load_student."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from deploy_helpers import DIM, tiny_student_config

from pipeline.errors import InputError
from pipeline.towers.student import build_student, load_student, save_student

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
TEXTS = ["A dog runs", "the cat sits on a man in red", "photo"]


def clip_dir(tmp_path, kind: str = "clip", projection_dim: int = 8):
    """A whole tiny CLIP or SigLIP (both halves), saved; token ids up to 20 (the conftest vocabulary)."""
    import transformers

    text = dict(vocab_size=20, max_position_embeddings=16, pad_token_id=0, eos_token_id=3, **SIZES)
    vision = dict(image_size=16, patch_size=8, num_channels=3, **SIZES)
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
        )
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


def text_dir(tmp_path, kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=20, dim=32, n_layers=1, n_heads=2, hidden_dim=64, pad_token_id=0)
        model = transformers.DistilBertModel(cfg)
    elif kind == "modernbert":
        cfg = transformers.ModernBertConfig(vocab_size=20, pad_token_id=0, max_position_embeddings=64, **SIZES)
        model = transformers.ModernBertModel(cfg)
    elif kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=20, pad_token_id=0, max_position_embeddings=40, **SIZES)
        model = transformers.RobertaModel(cfg, add_pooling_layer=False)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


def student(tokenizer_dir, *, text=None, image=None):
    cfg = tiny_student_config(tokenizer_dir)
    if text:
        cfg = replace(cfg, text=replace(cfg.text, **text))
    if image:
        cfg = replace(cfg, image=replace(cfg.image, **image))
    torch.manual_seed(0)
    return build_student(cfg, DIM).eval()


def round_trip(model, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    save_student(model, tmp_path / "saved")
    loaded = load_student(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded.encode_texts(TEXTS), model.encode_texts(TEXTS))
        assert torch.equal(loaded.encode_images(images), model.encode_images(images))


def by_hand_text(model, pooling):
    """The text model's own forward, pooled as `pooling` says (the oracle of the tower's wiring)."""
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        out = model.text_tower.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        if pooling == "pooler":
            return out.pooler_output
        if pooling == "cls":
            return out.last_hidden_state[:, 0]
        m = tok["attention_mask"].unsqueeze(-1).float()
        return (out.last_hidden_state * m).sum(1) / m.sum(1)


@pytest.mark.parametrize(
    "kind,pooling", [("distilbert", "mean"), ("distilbert", "cls"), ("modernbert", "mean"), ("roberta", "cls")]
)
def test_any_automodel_text_encoder(tokenizer_dir, tmp_path, kind, pooling):
    model = student(tokenizer_dir, text={"path": text_dir(tmp_path, kind), "pooling": pooling})
    assert model.text_tower.model.config.model_type == kind
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.text_tower(**tok), by_hand_text(model, pooling), rtol=0, atol=0)
    round_trip(model, tmp_path)


def test_a_pooler_the_model_lacks_and_too_many_tokens_are_one_line(tokenizer_dir, tmp_path):
    path = text_dir(tmp_path, "distilbert")
    with pytest.raises(InputError, match="distill.student.text.path: pooling `pooler`: a distilbert model has no"):
        student(tokenizer_dir, text={"path": path, "pooling": "pooler"})
    with pytest.raises(InputError, match="max_tokens: 100 > the model's 40 positions"):
        student(tokenizer_dir, text={"path": text_dir(tmp_path, "roberta"), "pooling": "mean", "max_tokens": 100})


def test_a_whole_small_clip_gives_both_towers(tokenizer_dir, tmp_path):
    """TinyCLIP-like: one CLIP directory for both towers, each its half (pooler: CLIP's own pooled outputs)."""
    from transformers import CLIPModel

    path = clip_dir(tmp_path)
    model = student(tokenizer_dir, text={"path": path, "pooling": "pooler"}, image={"path": path, "pooling": "pooler"})
    clip = CLIPModel.from_pretrained(path).eval()
    tok = model.tokenize(TEXTS)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # CLIP's own text / image features are its projections of exactly these pooled outputs
        text = clip.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        torch.testing.assert_close(model.text_tower(**tok), text, rtol=0, atol=0)
        torch.testing.assert_close(model.image_tower(pixels), clip.vision_model(pixel_values=pixels).pooler_output,
                                   rtol=0, atol=0)  # fmt: skip
        mean = student(tokenizer_dir, image={"path": path, "pooling": "mean"}).image_tower(pixels)
        hidden = clip.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(mean, hidden[:, 1:].mean(1), rtol=0, atol=0)  # patches only, not CLS
    round_trip(model, tmp_path)


def test_a_whole_clip_into_its_own_dimension_starts_as_that_clip(tokenizer_dir, tmp_path):
    """projection_dim = the student's dim: the projections are CLIP's, so the untrained student is the CLIP."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    path = clip_dir(tmp_path, projection_dim=DIM)
    model = student(tokenizer_dir, text={"path": path, "pooling": "pooler"}, image={"path": path, "pooling": "pooler"})
    clip = CLIPModel.from_pretrained(path).eval()
    tok = model.tokenize(TEXTS)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = model.normalize_pixels(model.to_float(images))
        theirs = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(model.encode_images(images), theirs, rtol=0, atol=1e-6)
        theirs = F.normalize(clip.get_text_features(**tok).pooler_output, dim=-1)
        torch.testing.assert_close(model.encode_texts(TEXTS), theirs, rtol=0, atol=1e-6)
    # another dimension, or the towers pooled otherwise: fresh projections
    from pipeline.towers.hf_models import dual_projections

    assert dual_projections(model.config, DIM) is not None and dual_projections(model.config, 2 * DIM) is None
    mean = replace(model.config, image=replace(model.config.image, pooling="mean"))
    assert dual_projections(mean, DIM) is None


@pytest.mark.parametrize("kind,pooling,prefix", [("siglip", "mean", 0), ("siglip", "pooler", 0), ("dinov2", "mean", 1),
                                                 ("dinov2", "cls", 1)])  # fmt: skip
def test_siglip_and_dinov2_image_towers(tokenizer_dir, tmp_path, kind, pooling, prefix):
    import transformers

    if kind == "siglip":
        path = clip_dir(tmp_path, "siglip")
        own = transformers.SiglipVisionModel.from_pretrained(path).eval()
    else:
        torch.manual_seed(0)
        own = transformers.Dinov2Model(transformers.Dinov2Config(image_size=16, patch_size=8, **SIZES)).eval()
        path = tmp_path / "dinov2"
        own.save_pretrained(path)
    model = student(tokenizer_dir, image={"path": path, "pooling": pooling})
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = own(pixel_values=pixels)
        expected = {
            "pooler": out.pooler_output,
            "cls": out.last_hidden_state[:, 0],
            "mean": out.last_hidden_state[:, prefix:].mean(1),
        }[pooling]
        torch.testing.assert_close(model.image_tower(pixels), expected, rtol=0, atol=0)
    round_trip(model, tmp_path)


def test_unsupported_image_models_and_poolings_are_one_line(tokenizer_dir, tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path / "resnet")
    with pytest.raises(InputError, match="image model_type 'resnet' is not supported .*dinov2"):
        student(tokenizer_dir, image={"path": tmp_path / "resnet"})
    with pytest.raises(InputError, match="pooling `cls`: a siglip model has no CLS token"):
        student(tokenizer_dir, image={"path": clip_dir(tmp_path, "siglip"), "pooling": "cls"})


def test_hub_ids_resolve_from_the_local_cache_only(tokenizer_dir, tmp_path, monkeypatch):
    """`path: org/name` is the cached snapshot of that repo (HF_HUB_CACHE), never a download."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-distilbert" / "snapshots" / ("0" * 40)
    shutil.copytree(text_dir(tmp_path, "distilbert"), snapshot)
    (cache / "models--tiny-org--tiny-distilbert" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-distilbert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = student(tokenizer_dir, text={"path": "tiny-org/tiny-distilbert", "pooling": "mean"})
    assert model.text_tower.model.config.model_type == "distilbert"
    with pytest.raises(InputError, match="tiny-org/missing is neither a directory nor a model in the local Hugging"):
        student(tokenizer_dir, text={"path": "tiny-org/missing", "pooling": "mean"})
