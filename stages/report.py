"""`kdpipe report`: one self-contained HTML page (metrics tables and plots, what each model retrieves).

kdpipe report [--split test] [--out <workdir>/report.html] [--model student=DIR --model baseline=DIR]
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, load_params, run_stage, writing
from stages._deploy import artifact_paths, every_model


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    split: str = typer.Option("test", "--split", help="Split to show."),
    model: list[str] = typer.Option(
        None,
        "--model",
        help="NAME=DIR of a saved model to show (repeatable; default: every trained model, the first seed of each "
        "variant of distill.runs, or the student and the baseline).",
    ),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default: <workdir>/report.html)."),
    captions: int = typer.Option(8, "--captions", min=1, help="How many test captions to show."),
    images: int = typer.Option(4, "--images", min=1, help="How many test images to show."),
    seed: int = typer.Option(0, "--seed", help="Which captions and images are sampled."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Write the HTML report: metrics, plots, and the teacher's and every model's retrievals side by side."""
    from pipeline.config import from_dict
    from pipeline.evaluate.report import run_report
    from pipeline.evaluate.run import EvaluateConfig

    paths = artifact_paths(params, workdir)
    # ranked as evaluate ranks them: its gallery mode (one pool, or one gallery per image directory)
    evaluate = from_dict(EvaluateConfig, (load_params(params) if params.is_file() else {}).get("evaluate"), "evaluate")
    models = every_model(params, paths)
    if model:
        models = {}
        for item in model:
            name, sep, directory = item.partition("=")
            if not sep or not name or not directory:
                raise ConfigError(f"--model {item!r}: expected NAME=DIR")
            models[name] = Path(directory)
    out = out or paths.workdir / "report.html"
    with writing(out, no_wait=no_wait):
        path, shown = run_report(
            paths.workdir,
            out,
            split=split,
            models=models,
            features=paths.features,
            metrics=paths.metrics_detail,
            run_info=paths.run_info,
            plots=paths.plots,
            gallery_mode=evaluate.gallery,
            n_captions=captions,
            n_images=images,
            seed=seed,
        )
    echo(f"report: {', '.join(shown)} on {split}; wrote {path} (open it in a browser)")
