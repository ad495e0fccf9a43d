"""The demo cross-encoder: its loss against a naive loop, its hard negatives against a naive ranking, bit-identical
training, the head file, the CrossEncoder interface, and `kdpipe fit-cross-encoder` fitting it on top of the LiT heads
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
    got = candidate_loss(head, head.image_parts(img), txt, candidates, masked)
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


def test_the_fit_is_the_same_on_one_thread_and_on_two():
    """The fit is bit-identical whatever the thread count (and so from one process to the next): no step may sum
    in an order the threads decide. A gather of shared image projections did (its backward a multithreaded
    scatter-add): the demo's cross-encoder came out different in each process, and the ablation row that
    reads it moved past its tolerance in CI. Sized so that such a kernel runs on several threads."""
    img, txt, text_image, groups = random_features(n_images=240, captions_per_image=2, seed=3)
    heads = _heads(dim=32)
    hard = hard_negatives(heads, img, txt, text_image, groups, 15)
    cfg = FitCrossEncoderConfig(hidden=64, hard_negatives=15, random_negatives=16, epochs=2, batch_size=160)
    threads = torch.get_num_threads()
    fits = []
    try:
        for n in (1, 2, 2, 2):
            torch.set_num_threads(n)
            fits.append(train_fusion(img, txt, text_image, groups, hard, cfg, heads, 20.0)[0].state_dict())
    finally:
        torch.set_num_threads(threads)
    for other in fits[1:]:
        for name, x in fits[0].items():
            assert torch.equal(x, other[name]), name


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
    with pytest.raises(InputError, match="not found; run `kdpipe fit-cross-encoder`"):
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
def test_fit_cross_encoder_sits_on_the_heads_and_scores_as_its_formula(emoji_pairs, tmp_path):  # noqa: F811
    from PIL import Image

    from pipeline.teachers.fit_fusion import CROSS_ENCODER_FILE, run_fit_cross_encoder
    from pipeline.teachers.fit_teacher import run_fit_teacher

    teacher_cfg = FitTeacherConfig(
        pairs=emoji_pairs / "teacher_pairs.json", image_root=emoji_pairs / "images", image_size=64, dim=32
    )
    teacher_cfg = FitTeacherConfig(**{**teacher_cfg.__dict__, "epochs": 5, "batch_size": 8, "lr": 1e-2})
    teacher = tmp_path / "teacher"
    fitted = run_fit_teacher(teacher_cfg, teacher)
    heads_bytes = (teacher / "heads.safetensors").read_bytes()
    (teacher / "cross_encoder.safetensors").write_bytes(b"an older fit-teacher's")  # its own name: removed on a rerun
    assert run_fit_teacher(teacher_cfg, teacher).sha256 == fitted.sha256
    assert not (teacher / "cross_encoder.safetensors").exists()
    out = tmp_path / "ce"
    ce_cfg = FitCrossEncoderConfig(
        heads=teacher / "heads.safetensors", hidden=16, hard_negatives=4, random_negatives=2, epochs=3, batch_size=8
    )
    result = run_fit_cross_encoder(ce_cfg, teacher_cfg, out)
    assert (teacher / "heads.safetensors").read_bytes() == heads_bytes  # the heads are read, never rewritten
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["sha256"] == result.sha256 and summary["heads_sha256"] == fitted.sha256
    assert run_fit_cross_encoder(ce_cfg, teacher_cfg, tmp_path / "again").sha256 == result.sha256  # bit for bit

    ce = build_cross_encoder(TeacherConfig(kind="fusion", fusion=FusionTeacherConfig(head=out / CROSS_ENCODER_FILE)))
    ident = ce.identity()
    assert ident["head_sha256"] == result.sha256 and ident["image_size"] == 64
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

    lit = build_teacher(TeacherConfig(kind="lit", lit=LiTTeacherConfig(heads=teacher / "heads.safetensors")))
    cos = (lit.encode_images(images) * lit.encode_texts(texts)).sum(-1)
    h_v = ce.head.image_proj((ce.towers.image_features(pixels) - ce.head.image_mean) / ce.head.image_std)
    h_t = ce.head.text_proj(ce.towers.text_features(ce.tokenize(texts)))
    correction = ce.head.out(torch.nn.functional.gelu(ce.head.fuse(torch.cat([h_v * h_t, h_v, h_t], -1)))).squeeze(-1)
    assert torch.allclose(scores, 1 / 0.05 * cos + correction, atol=1e-4)
    with pytest.raises(InputError, match="^fit_cross_encoder.heads: .* not found"):
        run_fit_cross_encoder(FitCrossEncoderConfig(heads=tmp_path / "none.safetensors"), teacher_cfg, tmp_path / "x")
