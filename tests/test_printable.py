"""What a terminal or a page shows: control characters, escape sequences and bidi controls from file names,
captions and ids are written as visible escapes at every output boundary (search results, report.html, error
lines, log lines, progress bars); every other character is kept."""

from __future__ import annotations

import json
import logging
import re
import unicodedata

import numpy as np
import pytest
from cli_helpers import one_error_line, run_cli
from deploy_helpers import tiny_workdir
from PIL import Image

from pipeline.evaluate.report import Ranking, ReportGallery, render_report
from pipeline.evaluate.tables import Table, html_tables
from pipeline.printable import html_text, printable
from pipeline.progress import configure_logging, progress

# set the terminal's title, colour, clear the screen, a CSI as one C1 byte, a carriage return that overwrites
# the line, right-to-left override and isolate, a line separator, NUL and DEL
HOSTILE = "\x1b]0;owned\x07 \x1b[31mred\x1b[0m \x1b[2J \x9b1m \rover \u202eevil\u202c \u2067iso\u2069 a\u2028b \x00\x7f"
SAFE = "café Ünïcödé 中文 العربية 🐈\u200d⬛ 👩🏽\u200d💻 tab-free"  # accents, CJK, RTL script, emoji with ZWJ
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def shows_nothing_hidden(text: str) -> bool:
    """The oracle: no control character (C0, DEL, C1) and no bidi control or line separator is left."""
    return not any(unicodedata.category(c) == "Cc" or c in BIDI for c in text)


def test_printable_escapes_every_control_and_keeps_everything_else():
    out = printable(HOSTILE + SAFE)
    assert shows_nothing_hidden(out)
    assert out.endswith(SAFE)  # untouched
    for seen in (r"\x1b]0;owned\x07", r"\x1b[31mred", r"\x9b1m", r"\x0dover", r"\u202eevil", r"\u2067iso", r"a\u2028b"):
        assert seen in out, seen
    assert printable(SAFE) == SAFE and printable("plain [brackets] 100%") == "plain [brackets] 100%"
    for code in range(0x110000):  # each character alone: escaped exactly when it is a control
        c = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        hidden = unicodedata.category(c) == "Cc" or c in BIDI
        assert (printable(c) != c) == hidden, hex(code)


def test_printable_limit_keeps_head_and_tail():
    text = "key: " + "x" * 10_000 + " what to do"
    out = printable(text, 300)
    assert out.startswith("key: xxx") and out.endswith("x what to do") and len(out) < 360
    left_out = int(re.search(r"\[([\d,]+) characters left out\]", out).group(1).replace(",", ""))
    assert left_out == len(text) - 200 - 100  # two thirds of the limit before, one third after
    assert printable("short", 300) == "short"


def test_report_page_shows_control_characters_as_escapes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ids, captions = [f"img{HOSTILE}.png", "b.png", "c.png"], [f"a dog {HOSTILE}", "a cat", f"{SAFE}"]
    emb = np.eye(3, dtype=np.float32)
    page = render_report(
        [Ranking(f"teacher{HOSTILE}", emb, emb)],
        ReportGallery.of(images, ids, captions, [0, 1, 2], "split"),
        metrics=None,
        run_info=None,
        plots=[],
        title=f"t{HOSTILE}",
        n_captions=3,
        n_images=3,
    )
    tables = html_tables([f"models: {HOSTILE}", Table([f"model{HOSTILE}", "RSUM"], [[f"s{HOSTILE}", "1.0"]])])
    for html in (page, tables):
        assert shows_nothing_hidden(html.replace("\n", ""))  # the page's own newlines only
        assert html_text(HOSTILE) in html and "\\x1b]0;owned\\x07" in html and "\\u202eevil" in html
    assert SAFE in page


def test_error_lines_and_log_lines_show_control_characters_as_escapes(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs").mkdir()
    name = "a\x1b]0;owned\x07\u202e.jpg"
    images = [{"filename": name, "split": "train", "sentences": [{"raw": f"a caption {HOSTILE}"}]}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images}))
    params = {"workdir": "w", "prepare": {"dataset": {"name": "t", "annotations": "ann.json", "image_root": "imgs"}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run_cli("prepare"))  # the image file is missing: the line names it
    assert shows_nothing_hidden(line) and "a\\x1b]0;owned\\x07\\u202e.jpg: file not found" in line

    monkeypatch.setenv("KDPIPE_PROGRESS", "1")  # the bar on, though stderr is no terminal here
    configure_logging(logging.INFO)
    logging.getLogger("pipeline.data.prepare").warning("skipped %s", name)
    with progress(f"decode [bold red]{name}", total=1) as bar:
        bar.advance()
    err = capsys.readouterr().err
    assert shows_nothing_hidden(err.replace("\n", ""))
    assert "warning: skipped a\\x1b]0;owned\\x07\\u202e.jpg" in err
    bar_line = next(line for line in err.splitlines() if " 1/1 " in line)  # the bar, not its summary line
    assert bar_line.startswith("decode [bold red]a\\x1b]0;owned")  # rich markup in a name is shown, not applied


@pytest.mark.usefixtures("one_thread")
def test_search_results_show_control_characters_as_escapes(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["\x1b]0;owned\x07\x1b[2J.png", "\u202egnp.exe.png", "plain.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (20, 20), (80 * i, 40, 200 - 60 * i)).save(folder / name)
    index = tmp_path / "index"
    assert run_cli("index", "--workdir", paths.workdir, "--folder", folder, "--index", index).exit_code == 0
    result = run_cli("search", "a dog", "--workdir", paths.workdir, "--index", index, "-k", "3")
    assert result.exit_code == 0, result.output
    assert shows_nothing_hidden(result.stdout.replace("\n", ""))
    hits = [re.match(r"\s*\d+\s+-?\d+\.\d+\s+(.*)$", line) for line in result.stdout.splitlines()]
    shown = sorted(m[1] for m in hits if m)
    assert shown == sorted(["\\x1b]0;owned\\x07\\x1b[2J.png", "\\u202egnp.exe.png", "plain.png"])
