"""The `kdpipe` console script (also `python -m stages`): one subcommand per stage.

A subcommand's module is imported when that subcommand runs (or `--help` lists them all), not before: each
imports what it needs, and `kdpipe search` does not pay for the evaluate stage's imports (torch's whole
dependency set of the evaluate, extract and distill stages), nor `kdpipe --version` for any.
"""

from __future__ import annotations

import importlib
import logging

import typer
from typer.core import TyperGroup
from typer.main import CommandInfo, get_command_from_info

import pipeline
from pipeline.progress import configure_logging

# subcommand -> (module, function), in the order `kdpipe --help` lists them
COMMANDS = {
    "fit-teacher": ("stages.fit_teacher", "command"),
    "prepare": ("stages.prepare", "command"),
    "extract": ("stages.extract", "command"),
    "mine": ("stages.mine", "command"),
    "distill": ("stages.distill", "command"),
    "evaluate": ("stages.evaluate", "command"),
    "demo-data": ("stages.demo_data", "command"),
    "export-hdf5": ("stages.features", "export_hdf5"),
    "import-hdf5": ("stages.features", "import_hdf5"),
    "import-dsmd": ("stages.features", "import_dsmd"),
    "import-embeddings": ("stages.features", "import_embeddings"),
    "export-embeddings": ("stages.features", "export_embeddings"),
    "export": ("stages.export", "command"),
    "index": ("stages.search", "index_command"),
    "search": ("stages.search", "search_command"),
    "report": ("stages.report", "command"),
    "verify": ("stages.verify", "command"),
}


class LazyGroup(TyperGroup):
    """The subcommands of COMMANDS, each built from its module when asked for."""

    def list_commands(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        return list(COMMANDS)

    def get_command(self, ctx, name):  # noqa: ANN001, ANN201
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name]
        callback = getattr(importlib.import_module(module), function)
        return get_command_from_info(
            CommandInfo(name=name, callback=callback), pretty_exceptions_short=True, rich_markup_mode=None
        )


app = typer.Typer(
    cls=LazyGroup,
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


def main() -> None:
    app()
