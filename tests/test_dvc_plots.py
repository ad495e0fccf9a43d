"""`dvc plots show` draws every plot without a network: .dvc/config names a page template with vega, vega-lite
and vega-embed inlined (.ci/vendor_vega.py). DVC's own page loads them from a CDN, and offline drew only the PNG."""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _vendor_script():
    spec = importlib.util.spec_from_file_location("vendor_vega", ROOT / ".ci" / "vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def template_path() -> Path:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return ROOT / ".dvc" / config["plots"]["html_template"]


def test_the_template_holds_the_scripts_and_their_licenses_and_fetches_nothing():
    page = template_path().read_text(encoding="utf-8")
    assert template_path() == _vendor_script().OUT
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds its CDN tags at {scripts}
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "sourceMappingURL" not in page
    for name, (version, _, _) in _vendor_script().PACKAGES.items():
        assert f"<script>/* {name} {version}, BSD-3-Clause" in page
        assert f"{name} {version} (https://www.npmjs.com/package/{name}), BSD-3-Clause:" in page
    assert page.count("Redistribution and use in source and binary forms") == 3
    assert len(page.encode()) < 1_000_000


def rendered_plots(chromium: str, page: Path) -> int:
    """How many vega plots headless Chromium drew in `page` (a canvas each), with every host unresolvable."""
    dom = subprocess.run(
        [
            *(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no network: a CDN is unreachable
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    return dom.count("<canvas")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_dvc_plots_show_draws_every_plot_offline(tmp_path):
    pytest.importorskip("dvc", reason="the dvc extra is not installed")
    out = tmp_path / "plots"
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--out", str(out)], cwd=ROOT, check=True, timeout=300)
    page = (out / "index.html").read_text(encoding="utf-8")
    n_vega = page.count("vegaEmbed(")
    assert n_vega >= 2 and "cdn.jsdelivr" not in page  # the recall curves at least, and the training curves
    assert rendered_plots(CHROMIUM, out / "index.html") == n_vega
    # the oracle: the same plots in DVC's own page, whose scripts come from the CDN, draw nothing here
    from dvc_render.html import PAGE_HTML
    from dvc_render.vega import VegaRenderer

    body = page[page.index("<body>") + len("<body>") : page.rindex("</body>")]
    cdn = PAGE_HTML.replace("{refresh_tag}", "").replace("{scripts}", VegaRenderer.SCRIPTS)
    (out / "cdn.html").write_text(cdn.replace("{plot_divs}", body), encoding="utf-8")
    assert rendered_plots(CHROMIUM, out / "cdn.html") == 0
