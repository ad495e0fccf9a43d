"""The `kdpipe` console script (also `python -m stages`): one subcommand per stage."""

from __future__ import annotations

import typer

import pipeline
from stages import demo_data, distill, evaluate, export, extract, features, prepare, report, search

app = typer.Typer(
    name="kdpipe",
    help="Distil a large image-text teacher into a small retrieval model from stored teacher features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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
) -> None:
    """Distil a large image-text teacher into a small retrieval model from stored teacher features."""


app.command("prepare")(prepare.command)
app.command("extract")(extract.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)
app.command("demo-data")(demo_data.command)
app.command("export-hdf5")(features.export_hdf5)
app.command("import-hdf5")(features.import_hdf5)
app.command("import-dsmd")(features.import_dsmd)
app.command("export")(export.command)
app.command("index")(search.index_command)
app.command("search")(search.search_command)
app.command("report")(report.command)


def main() -> None:
    app()
