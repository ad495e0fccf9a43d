"""The `kdpipe` console script (also `python -m stages`): the commands of COMMANDS, in the order a user meets them.

A command is imported when it runs or shows its own --help, never before: `kdpipe --help` and `kdpipe --version`
import no command module (the pipeline's commands pull in torch, transformers and zarr, seconds of start-up), and
`kdpipe verify` does not pay for what `kdpipe distill` needs. Adding a command is two steps:

1. Write its typer function in `stages/<module>.py` (parse options -> typed config -> pipeline call; see
   stages/_common.py). At the top of the module import only typer, `stages._common` and other modules that
   import nothing heavy; import the pipeline code the command runs inside the function
   (`from pipeline.mine.run import MineConfig, run_mine`), so that `kdpipe <command> --help` is instant too.
2. Add one line `"name": ("stages.module", "function")` under its heading in COMMANDS.

`kdpipe --help` lists each command with the first paragraph of its function's docstring, read from the source
file without importing it. tests/test_cli.py holds every command to this (import cost, summaries, help text).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import typer
from typer.core import TyperGroup

# Every command: name -> (module, function), under the heading `kdpipe --help` shows it under, in order of use.
COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "The pipeline, in order (dvc repro runs it)": {
        "prepare": ("stages.prepare", "command"),
        "extract": ("stages.extract", "command"),
        "mine": ("stages.mine", "command"),
        "views": ("stages.views", "command"),
        "distill": ("stages.distill", "command"),
        "evaluate": ("stages.evaluate", "command"),
    },
    "Using the student": {
        "search": ("stages.search", "search_command"),
        "index": ("stages.search", "index_command"),
        "report": ("stages.report", "command"),
        "export": ("stages.export", "command"),
    },
    "Feature stores": {
        "verify": ("stages.verify", "command"),
        "export-hdf5": ("stages.features", "export_hdf5"),
        "import-hdf5": ("stages.features", "import_hdf5"),
        "import-dsmd": ("stages.features", "import_dsmd"),
        "import-embeddings": ("stages.features", "import_embeddings"),
        "export-embeddings": ("stages.features", "export_embeddings"),
    },
    "The demo's own stages (dvc repro runs the first two; the ablation's dvc.yaml the third)": {
        "demo-data": ("stages.demo_data", "command"),
        "fit-teacher": ("stages.fit_teacher", "command"),
        "fit-cross-encoder": ("stages.fit_cross_encoder", "command"),
    },
}

HELP = """Distil a large image-text teacher into a small retrieval model from stored teacher features.

Start here: `dvc repro` runs the whole pipeline of dvc.yaml with params.yaml (the built-in demo: README.md).
The same commands by hand, in order, each reading its section of params.yaml (--params FILE,
--set SECTION.KEY=VALUE):

\b
    kdpipe prepare      dataset -> index + student image cache
    kdpipe extract      teacher -> feature store (once)
    kdpipe mine         optional: the teacher's nearest neighbours (DCD, MCAD)
    kdpipe views        optional: the teacher on several views of each image
    kdpipe distill      student <- stored teacher features
    kdpipe evaluate     recalls of teacher and student -> metrics.json
    kdpipe search "a dog on a beach"

`kdpipe COMMAND --help` tells more about each.
"""

EPILOG = (
    "Environment: KDPIPE_PROGRESS=1 or 0 turns progress bars on or off (default: on when stderr is a "
    "terminal). KDPIPE_FSYNC=0 skips fsync after writes (faster; a killed run still resumes exactly, "
    "but an OS crash or power loss may lose recent writes). OMP_NUM_THREADS sets the intra-op CPU "
    "threads when params.yaml's runtime.threads is unset (default: the CPUs this process may use, minus "
    "its loader workers). OMP_WAIT_POLICY: kdpipe's default is PASSIVE (waiting threads sleep, which "
    "a shared machine needs)."
)


@functools.cache
def summary(module: str, function: str) -> str:
    """The first paragraph of `module.function`'s docstring, on one line, read from the source file (the module
    is not imported: importing is what costs)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    tree = ast.parse(Path(spec.origin).read_bytes())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    return ""


class LazyCommands(Mapping):
    """COMMANDS as click sees them, name -> click command, each built (its module imported) on first access.
    Iterating yields the names in order without building any."""

    def __init__(self, markup_mode) -> None:
        self._targets = {name: target for group in COMMANDS.values() for name, target in group.items()}
        self._markup_mode = markup_mode
        self._built: dict[str, typer.core.TyperCommand] = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            module, function = self._targets[name]  # KeyError: no such command
            callback = getattr(importlib.import_module(module), function)
            info = typer.models.CommandInfo(name=name, callback=callback)
            self._built[name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=self._markup_mode
            )
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


class KdpipeGroup(TyperGroup):
    """The root command: its subcommands are COMMANDS (LazyCommands), listed under their headings."""

    def __init__(self, *, commands=None, **kwargs) -> None:
        if commands:
            raise TypeError(
                f"stages/cli.py: add {', '.join(commands)} to COMMANDS, not with app.command() (which imports "
                "its module on every kdpipe call)"
            )
        super().__init__(**kwargs)
        self.commands = LazyCommands(self.rich_markup_mode)

    def format_commands(self, ctx, formatter) -> None:
        """One section per heading of COMMANDS, each command with its docstring's summary (nothing imported)."""
        width = max(len(name) for group in COMMANDS.values() for name in group)
        for heading, group in COMMANDS.items():
            with formatter.section(heading):
                formatter.write_dl([(name.ljust(width), summary(*target)) for name, target in group.items()])


# Plain help (rich_markup_mode=None): click's layout shows a flag as a flag (rich's shows `--onnx <bool>`) and
# prints help text as written (rich reads `kdpipe[onnx]` as a markup tag and drops it).
app = typer.Typer(
    cls=KdpipeGroup,
    name="kdpipe",
    help=HELP,
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"kdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the kdpipe version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only (no status lines)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages too."),
) -> None:
    # runs before every command (not for --help or --version): the library's log records on stderr
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other")
    from pipeline.progress import configure_logging

    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def main() -> None:
    app()
