"""The demo cross-encoder: its loss against a naive loop, its hard negatives against a naive ranking, bit-identical
training, the head file, the CrossEncoder interface, and `kdpipe fit-teacher` fitting it beside the LiT heads
without changing them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_lit_teacher import emoji_pairs, random_features  # noqa: F401 -- emoji_pairs is a fixture

from pipeline.errors import ConfigError, InputError
from pipeline.teachers import FusionTeacherConfig, TeacherConfig, build_teacher
from pipeline.teachers.cross_encoders import build_cross_encoder
from pipeline.teachers.fit_fusion import FitCrossEncoderConfig, candidate_loss, hard_negatives, train_fusion
from pipeline.teachers.fit_teacher import FitTeacherConfig, train_heads
from pipeline.teachers.fusion import FusionHead

CFG = FitCrossEncoderConfig(hidden=8, hard_negatives=3, random_negatives=2, epochs=6, batch_size=6, lr=1e-2)


def _heads(seed=0, dim=6):
    img, txt, text_image, groups = random_features(seed=seed)
    cfg = FitTeacherConfig(dim=dim, epochs=1, batch_size=4)
    return train_heads(img, txt, text_image, groups, cfg, variant="lite2", image_size=64)[0]


def _head(seed=0, hidden=8):
    g = torch.Generator().manual_seed(seed)
    head = FusionHead("lite2", 64, hidden, _heads(seed), 20.0)
    for p in head.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return head.double()


def test_candidate_loss_matches_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    head = _head()
    img = torch.randn(7, 1280, generator=g, dtype=torch.float64)
    txt = torch.randn(3, 384, generator=g, dtype=torch.float64)
    candidates = torch.tensor([[0, 4, 4, 6], [1, 0, 2, 3], [5, 5, 6, 1]])  # repeats: each image projected once
    masked = torch.tensor([[False, False, True, False], [False, False, False, False], [False, True, False, False]])
    got = candidate_loss(head, img, txt, candidates, masked)
    total = 0.0
    for b in range(3):
        logits = [
            float(head(img[c][None], txt[b][None]).detach()[0])
            for c, m in zip(candidates[b].tolist(), masked[b].tolist())
            if not m
        ]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[0]
    assert float(got.detach()) == pytest.approx(total / 3, rel=1e-10)


def test_hard_negatives_are_the_heads_most_similar_images_of_other_groups():
    img, txt, text_image, groups = random_features(n_images=10)
    heads, _ = train_heads(
        img, txt, text_image, groups, FitTeacherConfig(dim=8, epochs=1, batch_size=4), variant="lite2", image_size=64
    )
    got = hard_negatives(heads, img, txt, text_image, groups, 4)
    v, t = heads.project_images(img), heads.project_texts(txt)
    for m in range(len(txt)):
        ranked = sorted((-float(t[m] @ v[j]), j) for j in range(len(img)) if groups[j] != groups[text_image[m]])
        assert got[m].tolist() == [j for _, j in ranked[:4]]
    with pytest.raises(InputError, match="hard_negatives = 9, but a caption has only 8 other images"):
        hard_negatives(heads, img, txt, text_image, groups, 9)


def test_the_head_starts_as_the_dual_encoder_trains_bit_identically_and_learns():
    img, txt, text_image, groups = random_features(n_images=12, captions_per_image=2)
    hard = torch.tensor(np.stack([np.roll(np.arange(12), -2 * (i // 2 + 1))[:3] for i in range(24)]))
    heads = _heads()
    start, _ = train_fusion(img, txt, text_image, groups, hard, FitCrossEncoderConfig(epochs=1, lr=1e-12), heads, 20.0)
    lit = 20.0 * (heads.project_images(img[text_image]) * heads.project_texts(txt)).sum(-1)
    assert torch.allclose(start(img[text_image], txt), lit, atol=1e-4)  # the correction starts at (almost) 0
    a, losses_a = train_fusion(img, txt, text_image, groups, hard, CFG, heads, 20.0)
    b, losses_b = train_fusion(img, txt, text_image, groups, hard, CFG, heads, 20.0)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert losses_a == losses_b and losses_a[-1] < 0.95 * losses_a[0]
    assert torch.equal(a.lit_image_weight, heads.image_weight)  # the heads stay frozen
    c, _ = train_fusion(
        img, txt, text_image, groups, hard, FitCrossEncoderConfig(**{**CFG.__dict__, "seed": 1}), heads, 20.0
    )
    assert not torch.equal(c.fuse.weight, a.fuse.weight)


def test_head_file_round_trip_and_refusals(tmp_path):
    head = _head().float()
    sha = head.save(tmp_path / "ce.safetensors", fit={"seed": 0})
    assert sha == head.save(tmp_path / "again.safetensors", fit={"seed": 0})  # the same bytes every time
    loaded = FusionHead.load(tmp_path / "ce.safetensors")
    for (name, x), y in zip(head.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name
    assert (loaded.variant, loaded.image_size, loaded.hidden, float(loaded.lit_scale)) == ("lite2", 64, 8, 20.0)
    x, t = torch.randn(5, 1280), torch.randn(5, 384)
    assert torch.equal(loaded(x, t), head(x, t))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="is not a fusion-head file"):
        FusionHead.load(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="not found; run `kdpipe fit-teacher`"):
        FusionHead.load(tmp_path / "absent.safetensors")


def test_a_pair_kind_never_embeds_and_an_embedding_kind_never_scores():
    with pytest.raises(ConfigError, match="scores pairs and embeds nothing"):
        build_teacher(TeacherConfig(kind="fusion"))
    with pytest.raises(ConfigError, match="'lit' embeds images and captions but cannot score a pair"):
        build_cross_encoder(TeacherConfig(kind="lit"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="hard_negatives must be at least 1"):
        FitCrossEncoderConfig(hard_negatives=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        FitCrossEncoderConfig(lr=0)


# -- with the real frozen towers (demo extras) ---------------------------------------------------------------
@pytest.mark.slow  # loads EfficientNet-Lite2 and MiniLM twice
def test_fit_teacher_fits_the_cross_encoder_beside_unchanged_heads(emoji_pairs, tmp_path):  # noqa: F811
    from PIL import Image

    from pipeline.teachers.fit_teacher import CROSS_ENCODER_FILE, run_fit_teacher

    base = dict(pairs=emoji_pairs / "teacher_pairs.json", image_root=emoji_pairs / "images", image_size=64, dim=32)
    base.update(epochs=5, batch_size=8, lr=1e-2)
    plain = run_fit_teacher(FitTeacherConfig(**base), tmp_path / "plain")
    out = tmp_path / "with"
    ce_cfg = FitCrossEncoderConfig(hidden=16, hard_negatives=4, random_negatives=2, epochs=3, batch_size=8)
    with_ce = run_fit_teacher(FitTeacherConfig(**base, cross_encoder=ce_cfg), out)
    # the heads (and so every feature store's teacher identity) do not change with a cross-encoder beside them
    assert (tmp_path / "plain" / "heads.safetensors").read_bytes() == (out / "heads.safetensors").read_bytes()
    assert with_ce.sha256 == plain.sha256 and with_ce.cross_encoder is not None
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["cross_encoder"]["sha256"] == with_ce.cross_encoder[1]

    ce = build_cross_encoder(TeacherConfig(kind="fusion", fusion=FusionTeacherConfig(head=out / CROSS_ENCODER_FILE)))
    ident = ce.identity()
    assert ident["head_sha256"] == with_ce.cross_encoder[1] and ident["image_size"] == 64
    json.dumps(ident)
    data = json.loads((emoji_pairs / "teacher_pairs.json").read_text())["images"]
    images = [Image.open(emoji_pairs / "images" / im["filepath"] / im["filename"]).convert("RGB") for im in data]
    texts = [im["sentences"][0]["raw"] for im in data]
    pixels = torch.stack([ce.preprocess_image(im) for im in images])
    scores = ce.score_pairs(pixels, ce.tokenize(texts))  # the one-call API ...
    by_states = ce.score_states(ce.image_states(pixels), ce.text_states(ce.tokenize(texts)))  # ... = the split one
    assert scores.shape == (12,) and torch.allclose(scores, by_states)
    # ... = the head on the towers' features, = the LiT teacher's score + the learned correction
    direct = ce.head(ce.towers.image_features(pixels), ce.towers.text_features(ce.tokenize(texts)))
    assert torch.allclose(scores, direct)
    from pipeline.teachers import LiTTeacherConfig

    lit = build_teacher(TeacherConfig(kind="lit", lit=LiTTeacherConfig(heads=out / "heads.safetensors")))
    cos = (lit.encode_images(images) * lit.encode_texts(texts)).sum(-1)
    h_v = ce.head.image_proj((ce.towers.image_features(pixels) - ce.head.image_mean) / ce.head.image_std)
    h_t = ce.head.text_proj(ce.towers.text_features(ce.tokenize(texts)))
    correction = ce.head.out(torch.nn.functional.gelu(ce.head.fuse(torch.cat([h_v * h_t, h_v, h_t], -1)))).squeeze(-1)
    assert torch.allclose(scores, 1 / 0.05 * cos + correction, atol=1e-4)
    # a rerun without a cross-encoder removes the one it wrote before (a stage rewrites its output)
    run_fit_teacher(FitTeacherConfig(**base), out)
    assert not (out / CROSS_ENCODER_FILE).exists()
