"""The `kdpipe` console script (also `python -m stages`): one subcommand per stage."""

from __future__ import annotations

import typer

from stages import demo_data, distill, evaluate, extract, features, prepare

app = typer.Typer(
    name="kdpipe",
    help="Distil a large image-text teacher into a small retrieval model from stored teacher features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("prepare")(prepare.command)
app.command("extract")(extract.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)
app.command("demo-data")(demo_data.command)
app.command("export-hdf5")(features.export_hdf5)
app.command("import-hdf5")(features.import_hdf5)
app.command("import-dsmd")(features.import_dsmd)


def main() -> None:
    app()
