"""`kdpipe demo-data`: build the demo's data from installed packages (nothing is downloaded or committed).

Default: the emoji dataset (Twemoji + OpenMoji, captions from their names; `pipeline.data.demo_emoji`), the
README's demo. `--photos`: the 27 package photos with committed captions (`pipeline.data.demo_photos`), kept
as a tiny end-to-end fixture.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import NO_WAIT_OPTION, echo, run_stage, writing

OUT_OPTION = typer.Option(
    None, "--out", help="Output directory (default: data/emoji; with --photos: data/demo/images)."
)
PHOTOS_OPTION = typer.Option(False, "--photos", help="Write the 27 package photos of the small demo instead.")


@run_stage
def command(out: Path | None = OUT_OPTION, photos: bool = PHOTOS_OPTION, no_wait: bool = NO_WAIT_OPTION) -> None:
    """Build the demo dataset (emoji in two styles, or --photos) from the installed packages."""
    if photos:
        from pipeline.data.demo_photos import DEMO_IMAGE_DIR, DEMO_JSON, build_demo_images

        out = out or DEMO_IMAGE_DIR
        with writing(out, no_wait=no_wait):
            files = build_demo_images(out)
        echo(f"wrote {len(files)} demo images to {out} (captions: {DEMO_JSON})")
        return
    from pipeline.data.demo_emoji import EMOJI_DIR, build_emoji_dataset

    out = out or EMOJI_DIR
    with writing(out, no_wait=no_wait):
        s = build_emoji_dataset(out)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(s.images_per_split.items()))
    echo(
        f"wrote {s.n_images} images of {s.n_emoji} emoji to {out} ({splits}; {s.unpaired_images} unpaired), "
        f"dataset_emoji.json and teacher_pairs.json ({s.teacher_pairs} teacher training pairs)"
    )
