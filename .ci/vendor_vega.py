"""Build .dvc/offline_plots.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so that
`dvc plots show` draws every plot without a network.

DVC's own page (dvc_render/html.py) loads those three scripts from a CDN: offline, only the PNG plots appear.
`.dvc/config` names this template (`plots.html_template`); DVC fills its `{plot_divs}` and, since it has no
`{scripts}` placeholder, adds no CDN script tags. The versions are the ones dvc-render's page loads
(dvc_render/vega.py, dvc-render 1.x), so the specs DVC writes are the ones these scripts were made for. All three
are BSD-3-Clause; their license texts go into the page beside their code.

Maintainers rerun it (it needs `npm` and the npm registry) after changing PACKAGES:
    python .ci/vendor_vega.py
Each tarball is checked against the registry's sha512 integrity recorded here before anything is taken from it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / ".dvc" / "offline_plots.html"

# name: (version, file in the package, npm integrity of the tarball)
PACKAGES = {
    "vega": (
        "5.20.2",
        "build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    "vega-lite": (
        "5.2.0",
        "build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    "vega-embed": (
        "6.18.2",
        "build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
}

PAGE = """<!DOCTYPE html>
<!-- kdpipe: DVC's plots page (dvc_render/html.py) with {names} inlined, so that
     `dvc plots show` draws every plot offline. Built by .ci/vendor_vega.py from the npm registry; do not edit.
{licenses}
-->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, member: str, integrity: str, work: Path) -> tuple[str, str]:
    """(the script, its LICENSE text) from the package's tarball, checked against `integrity`."""
    subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=work, check=True, capture_output=True)
    tarball = work / f"{name}-{version}.tgz"
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"{tarball.name}: integrity {digest}, expected {integrity}")
    with tarfile.open(tarball) as tar:
        script = tar.extractfile(f"package/{member}").read().decode("utf-8")
        license_text = tar.extractfile("package/LICENSE").read().decode("utf-8")
    # no source map: the page must not ask for anything (a browser's developer tools would fetch it)
    script = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", script)
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}", "-->"):
        if bad in script or bad in license_text:
            raise SystemExit(f"{name}: contains {bad!r}, which would break the page")
    return script, license_text


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        parts = {name: fetch(name, *spec, Path(tmp)) for name, spec in PACKAGES.items()}
    names = ", ".join(f"{n} {v[0]}" for n, v in PACKAGES.items())
    licenses = "\n".join(
        f"\n{name} {PACKAGES[name][0]} (https://www.npmjs.com/package/{name}), BSD-3-Clause:\n\n{text.strip()}"
        for name, (_, text) in parts.items()
    )
    scripts = "\n".join(
        f"    <script>/* {name} {PACKAGES[name][0]}, BSD-3-Clause (license text at the top) */\n{code}\n    </script>"
        for name, (code, _) in parts.items()
    )
    OUT.write_text(PAGE.format(names=names, licenses=licenses, scripts=scripts), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes): {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
