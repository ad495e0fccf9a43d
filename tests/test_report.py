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

from pipeline.evaluate.report import Ranking, render_report, topk
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
    text_image = np.array([0, 1, 2])
    emb = np.eye(3, dtype=np.float32)  # each caption's nearest image is its own
    page = render_report(
        [Ranking("teacher", emb, emb), Ranking("student<i>", emb, emb[[1, 0, 2]])],
        images,
        ids,
        captions,
        text_image,
        metrics={"teacher": {"rsum": 600.0}},
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


def test_cli_report_on_a_workdir(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir, captions={0: EVIL})
    paths.metrics.write_text(json.dumps({"dataset": "toy", "split": "test", "teacher": {"rsum": 300.0}}))
    paths.plots.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(paths.plots / "recall_at_k.png")
    result = CliRunner().invoke(app, ["report", "--workdir", str(paths.workdir), "--captions", "30"])
    assert result.exit_code == 0, result.output
    page = (paths.workdir / "report.html").read_text()
    assert "student" in page and "baseline" in page and html.escape(EVIL) in page and "<script>" not in page
    assert page.count('<figure class="ok">') >= 1
    assert 'alt="recall_at_k.png"' in page and "<td>300.00</td>" in page  # the plot inlined, the table filled


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_renders_in_headless_chromium(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir, captions={0: EVIL})
    out = tmp_path / "report.html"
    assert CliRunner().invoke(app, ["report", "--workdir", str(paths.workdir), "--out", str(out)]).exit_code == 0
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

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1400, 1200)
    green = (img[..., 1] > 140) & (img[..., 0] < 60) & (img[..., 2] < 90)  # the correct-image frames drew
    assert green.sum() > 100 and img.std() > 20  # not a blank page
    if os.environ.get("KDPIPE_SCREENSHOT"):  # .ci/run keeps it for a person to look at
        shutil.copy(shot, os.environ["KDPIPE_SCREENSHOT"])
