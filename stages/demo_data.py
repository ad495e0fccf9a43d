"""`kdpipe demo-data`: write the built-in demo's photos (shipped in scikit-image, scikit-learn, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data.demo_photos import DEMO_IMAGE_DIR, DEMO_JSON
from stages._common import echo, run_stage

OUT_OPTION = typer.Option(DEMO_IMAGE_DIR, "--out", help="Directory the demo JPEG files are written to.")


@run_stage
def command(out: Path = OUT_OPTION) -> None:
    """Write the demo images (captions: data/demo/dataset_demo.json) from the installed packages."""
    from pipeline.data.demo_photos import build_demo_images

    files = build_demo_images(out)
    echo(f"wrote {len(files)} demo images to {out} (captions: {DEMO_JSON})")
