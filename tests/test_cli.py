"""The command line: what `kdpipe --help`, `kdpipe --version` and each `kdpipe COMMAND --help` import (counted in
a fresh interpreter, not timed), the order and summaries of the command list, and help text shown as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from stages.cli import COMMANDS, KdpipeGroup, app, summary

REPO = Path(__file__).resolve().parents[1]
# What the pipeline's commands run on: seconds of start-up between them. A help screen needs none of it.
HEAVY = ("torch", "numpy", "zarr", "transformers", "tokenizers", "safetensors", "PIL", "faiss", "h5py", "scipy")
NAMES = [name for group in COMMANDS.values() for name in group]
MODULES = sorted({module for group in COMMANDS.values() for module, _ in group.values()})

# Runs the CLI in a fresh interpreter; prints, after each argument list, the top-level modules it newly imported.
PROBE = """
import json, sys
seen = set(sys.modules)  # the interpreter's own: what stages.cli imports counts too
from typer.testing import CliRunner
from stages.cli import app
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output, repr(result.exception))
    new = sorted(set(sys.modules) - seen)
    seen.update(new)
    print(json.dumps([args, new]))
"""


def imports_of(arg_lists: list[list[str]]) -> list[tuple[list[str], list[str]]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(arg_lists)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(json.loads(line)) for line in out.stdout.splitlines()]


def test_help_and_version_import_no_command_and_nothing_heavy():
    for args, new in imports_of([["--help"], ["--version"]]):
        heavy = [m for m in new if m.split(".")[0] in HEAVY]
        commands = [m for m in new if m in MODULES]
        assert heavy == [] and commands == [], f"kdpipe {' '.join(args)} imported {heavy + commands}"


def test_each_command_help_imports_nothing_heavy():
    """A command module imports the pipeline code it runs inside its function (stages/cli.py's docstring)."""
    for args, new in imports_of([[name, "--help"] for name in NAMES]):
        heavy = [m for m in new if m.split(".")[0] in HEAVY]
        assert heavy == [], f"kdpipe {' '.join(args)} imported {sorted({m.split('.')[0] for m in heavy})}"


def test_help_lists_every_command_under_its_heading_in_order_with_its_docstring():
    out = CliRunner().invoke(app, ["--help"], terminal_width=400).output
    positions = []
    for heading, group in COMMANDS.items():
        assert f"\n{heading}:\n" in out
        for name, target in group.items():
            line = re.search(rf"^  {re.escape(name)} +(.+)$", out, re.M)
            assert line, f"{name} not listed"
            positions.append(line.start())
            built = typer.main.get_command(app).get_command(None, name)
            # the line is read from the source without importing; it must say what the command's own help says
            assert summary(*target) and line.group(1) == summary(*target) == " ".join(
                built.help.split("\n\n")[0].split()
            )
    assert positions == sorted(positions)


def test_help_says_where_to_start():
    out = CliRunner().invoke(app, ["--help"]).output
    assert "dvc repro" in out
    recipe = re.findall(r"^ +kdpipe ([a-z-]+) ", out, re.M)
    pipeline = list(next(iter(COMMANDS.values())))
    steps = [name for name in recipe if name in pipeline]
    # the pipeline from its first command to its last, in the order the command list shows it (optional ones aside)
    assert steps[0] == pipeline[0] and steps[-1] == pipeline[-1] and steps == sorted(steps, key=pipeline.index)


def help_of(name: str) -> tuple[click.Command, str]:
    cmd = typer.main.get_command(app).get_command(None, name)
    return cmd, CliRunner().invoke(app, [name, "--help"], terminal_width=400).output


@pytest.mark.parametrize("name", NAMES)
def test_flags_show_as_flags_and_help_text_as_written(name):
    cmd, out = help_of(name)
    assert "<bool>" not in out
    flat = " ".join(out.split())
    for param in cmd.params:
        if isinstance(param, click.Option):
            if param.is_flag:  # `--fresh  Start over...`, not `--fresh <bool>` nor `--fresh BOOLEAN`
                assert re.search(
                    rf"^  (-\w, )?{'(/| / )'.join(map(re.escape, param.opts + param.secondary_opts))}  ", out, re.M
                )
            # brackets and all: `needs kdpipe[onnx]` is text, not markup
            assert " ".join((param.help or "").split()) in flat, f"{name} {param.opts[0]}: help text altered"


def test_every_extra_named_in_help_exists():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {e for name in NAMES for e in re.findall(r"kdpipe\[(\w+)\]", help_of(name)[1])}
    assert named and named <= set(extras)


def test_an_unknown_command_gets_suggestions_without_importing_every_command():
    result = CliRunner().invoke(app, ["expor"])
    assert result.exit_code == 2 and "Did you mean 'export'" in result.output


def test_a_command_registered_the_eager_way_is_refused_with_the_way_to_register_it():
    eager = typer.Typer(cls=KdpipeGroup)
    eager.callback()(lambda: None)
    eager.command("mine")(lambda: None)
    with pytest.raises(TypeError, match="add mine to COMMANDS"):
        typer.main.get_command(eager)
