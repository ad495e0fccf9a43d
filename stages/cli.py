"""The `kdpipe` console script (also `python -m stages`): one subcommand per stage."""

from __future__ import annotations

import logging

import typer

import pipeline
from pipeline.progress import configure_logging
from stages import demo_data, distill, evaluate, export, extract, features, fit_teacher, prepare, report, search, verify

app = typer.Typer(
    name="kdpipe",
    help="Distil a large image-text teacher into a small retrieval model from stored teacher features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    epilog=(
        "Environment: KDPIPE_PROGRESS=1 or 0 turns progress bars on or off (default: on when stderr is a "
        "terminal). KDPIPE_FSYNC=0 skips fsync after writes (faster; a killed run still resumes exactly, "
        "but an OS crash or power loss may lose recent writes). OMP_NUM_THREADS sets the intra-op CPU "
        "threads when params.yaml's runtime.threads is unset (default: the CPUs this process may use, minus "
        "its loader workers). OMP_WAIT_POLICY: kdpipe's default is PASSIVE (waiting threads sleep, which "
        "a shared machine needs)."
    ),
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kdpipe {pipeline.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the kdpipe version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only (no status lines)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages too."),
) -> None:
    """Distil a large image-text teacher into a small retrieval model from stored teacher features."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other")
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


app.command("fit-teacher")(fit_teacher.command)
app.command("prepare")(prepare.command)
app.command("extract")(extract.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)
app.command("demo-data")(demo_data.command)
app.command("export-hdf5")(features.export_hdf5)
app.command("import-hdf5")(features.import_hdf5)
app.command("import-dsmd")(features.import_dsmd)
app.command("import-embeddings")(features.import_embeddings)
app.command("export-embeddings")(features.export_embeddings)
app.command("export")(export.command)
app.command("index")(search.index_command)
app.command("search")(search.search_command)
app.command("report")(report.command)
app.command("verify")(verify.command)


def main() -> None:
    app()
