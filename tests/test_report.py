"""`kdpipe report`: one self-contained HTML page; untrusted captions and ids are escaped; the correct images
are marked by the same ranking as a naive oracle; it renders in headless Chromium (screenshot)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from deploy_helpers import tiny_workdir
from typer.testing import CliRunner

from pipeline.evaluate.report import (
    Ranking,
    ReportGallery,
    caption_section,
    image_section,
    render_report,
    stratified_sample,
    topk,
)
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
EVIL = "<script>alert('x')</script> \"quoted\" & <b>bold</b>"


def test_topk_is_a_naive_ranking():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((5, 8)), rng.standard_normal((30, 8))
    s = q @ g.T
    expected = [sorted(range(30), key=lambda j: -s[i, j])[:4] for i in range(5)]
    assert topk(q, g, 4).tolist() == expected


def test_page_escapes_untrusted_text_and_marks_the_correct_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ids = ['img"0<x>', "img1", "img2"]
    captions = [EVIL, "a dog", "a cat"]
    emb = np.eye(3, dtype=np.float32)  # each caption's nearest image is its own
    page = render_report(
        [Ranking("teacher", emb, emb), Ranking("student<i>", emb, emb[[1, 0, 2]])],
        ReportGallery.of(images, ids, captions, [0, 1, 2], "split"),
        metrics=None,
        run_info=None,
        plots=[],
        title="t",
        n_captions=3,
    )
    assert "<script>" not in page and "<b>bold</b>" not in page and "<x>" not in page and "<i>" not in page
    assert html.escape(EVIL) in page and "img&quot;0&lt;x&gt;" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing is loaded from anywhere
    assert "default-src 'none'" in page
    # caption 0: the teacher's top-1 is image 0 (marked); the student ranks image 1 first, image 0 still marked
    first = page.split('class="q"')[1]
    teacher, student = first.split('<div class="model">')[1:3]
    assert teacher.index('class="ok"') < teacher.index("img1")
    assert student.index("img1") < student.index('class="ok"')


def two_style_gallery(mode: str):
    """Six emoji drawn in two styles (a/ and b/), one caption each, the same text for both drawings."""
    rng = np.random.default_rng(1)
    ids = [f"{style}/{e}.png" for style in "ab" for e in range(6)]
    captions = [f"emoji {e}" for _ in "ab" for e in range(6)]
    return ReportGallery.of(rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), ids, captions, range(12), mode)


def shown_images(section: str) -> list[list[list[str]]]:
    """[query][model] -> the ids shown, from a caption section."""
    out = []
    for query in section.split('<div class="q">')[1:]:
        out.append([re.findall(r'<img src="[^"]*" alt="([^"]*)"', m) for m in query.split('<div class="model">')[1:]])
    return out


@pytest.mark.parametrize("mode", ["split", "by_directory"])
def test_captions_are_ranked_within_their_gallery_as_evaluate_does(mode):
    """by_directory: a caption's top-k hold only its own style's images, the naive per-gallery ranking; split: one
    pool, where the other style's drawing of the same emoji is framed as 'same caption' (not a hit)."""
    gallery = two_style_gallery(mode)
    rng = np.random.default_rng(2)
    img, txt = rng.standard_normal((12, 4)).astype(np.float32), rng.standard_normal((12, 4)).astype(np.float32)
    txt[0] = img[6]  # caption "emoji 0" of a/0.png is nearest to b/0.png, the other style's drawing
    section = caption_section([Ranking("m", img, txt)], gallery, np.arange(12), k=3)
    for c, (models,) in enumerate(shown_images(section)):
        pool = np.arange(12) if mode == "split" else np.arange(6) + 6 * (c // 6)
        scores = txt[c] @ img[pool].T
        naive = [gallery.ids[pool[j]] for j in sorted(range(len(pool)), key=lambda j: -scores[j])[:3]]
        assert models == naive
    first = section.split('<div class="q">')[1]
    if mode == "split":
        assert first.index('class="same" title="b/0.png: emoji 0"') < first.index('class="ok" title="a/0.png:')
        assert "(gallery" not in first
    else:
        assert 'class="same"' not in section and "(gallery a)" in first and "b/" not in first


def test_image_captions_are_ranked_within_the_gallery_too():
    gallery = two_style_gallery("by_directory")
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((12, 4)).astype(np.float32)
    section = image_section([Ranking("m", emb, emb)], gallery, np.array([0, 7]), k=6)
    a, b = section.split('<div class="irow">')[1:]
    assert a.count("<li") == 6 and '<li class="ok">&#10003; emoji 0</li>' in a  # its own caption, once
    assert '<li class="ok">&#10003; emoji 1</li>' in b and "= emoji" not in a + b  # no copy of the other style
    pooled = image_section([Ranking("m", emb, emb)], two_style_gallery("split"), np.array([0]), k=12)
    assert '<li class="same">= emoji 0</li>' in pooled  # one pool: b/0.png's same caption shows, marked


def test_samples_come_from_every_gallery():
    groups = [np.arange(100), np.arange(100, 103)]
    picks = stratified_sample(groups, 6, np.random.default_rng(0))
    assert len(picks) == 6 and (picks >= 100).sum() == 3  # the small gallery is shown as much as the large one


def test_cli_report_shows_every_model_the_intervals_and_the_galleries(tokenizer_dir, tmp_path):
    import shutil as sh

    import yaml

    from pipeline.paths import ArtifactPaths

    paths = tiny_workdir(tmp_path, tokenizer_dir, captions={0: EVIL}, styles=("a", "b"))
    runs = {"seeds": [0], "variants": {"s_one": {}, "s_two": {}, "base": {"baseline": True}}, "compare_to": "base"}
    params = tmp_path / "params.yaml"
    evaluate = {"gallery": "by_directory", "device": "cpu", "latency": False, "bootstrap_resamples": 50}
    doc = {"workdir": str(paths.workdir), "distill": {"runs": runs}, "evaluate": evaluate}
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    sh.copytree(paths.student, paths.model("s_one-s0"))
    sh.copytree(paths.student, paths.model("s_two-s0"))
    sh.move(paths.workdir / "baseline", paths.model("base-s0"))
    result = CliRunner().invoke(app, ["evaluate", "--params", str(params)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", "--params", str(params), "--captions", "6"])
    assert result.exit_code == 0, result.output
    assert "report: teacher, s_one, s_two, base on test" in result.output  # every trained model, in run order
    page = (paths.workdir / "report.html").read_text()
    assert html.escape(EVIL) in page and "<script>" not in page
    record = json.loads(ArtifactPaths(paths.workdir).metrics_detail.read_text())
    iv = record["s_one"]["rsum_vs_base"]
    assert f"<td>{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})</td>" in page  # the interval
    assert "<th>RSUM per gallery</th><th>a</th><th>b</th>" in page and "<th>seeds (RSUM sd)</th>" in page
    assert 'alt="recall_at_k.png"' in page and "(gallery a)" in page and "(gallery b)" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_renders_in_headless_chromium(tokenizer_dir, tmp_path):
    """The page a team opens: tables, the plot, the framed hits, drawn over the width of the window."""
    import yaml

    paths = tiny_workdir(tmp_path, tokenizer_dir, captions={0: EVIL}, styles=("twemoji", "openmoji"))
    params = tmp_path / "params.yaml"
    evaluate = {"gallery": "by_directory", "device": "cpu", "latency": False, "bootstrap_resamples": 50}
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir), "evaluate": evaluate}))
    assert CliRunner().invoke(app, ["evaluate", "--params", str(params)]).exit_code == 0
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shot = tmp_path / "report.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1200,1400",
        out.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert img.shape[:2] == (1400, 1200)
    green = (img[..., 1] > 140) & (img[..., 0] < 60) & (img[..., 2] < 90)  # the correct-image frames drew
    assert green.sum() > 100 and img.std() > 20  # not a blank page
    # the content uses the page's width: something is drawn in the right quarter of most of its rows (the
    # tables, the plot, the models side by side), not only in the left half
    drawn = (np.abs(img - 255).sum(axis=2) > 60)[:, 900:1170].any(axis=1)
    assert drawn.mean() > 0.3, drawn.mean()
    if os.environ.get("KDPIPE_SCREENSHOT"):  # .ci/run keeps it for a person to look at
        shutil.copy(shot, os.environ["KDPIPE_SCREENSHOT"])
