"""The library logs, the CLI shows: status lines through `logging`, --quiet / --verbose, the help's details."""

import logging

import pytest
from typer.testing import CliRunner

from pipeline.progress import configure_logging, progress
from stages.cli import app


@pytest.fixture(autouse=True)
def _restore_levels():
    loggers = [logging.getLogger(n) for n in ("pipeline", "stages")]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    yield
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def test_status_lines_go_through_logging_and_the_console_handler(capsys, monkeypatch):
    monkeypatch.setenv("KDPIPE_PROGRESS", "0")
    configure_logging(logging.INFO)
    configure_logging(logging.INFO)  # idempotent: still one handler, one line per record
    logging.getLogger("pipeline.data.prepare").info("prepare: wrote /tmp/[x]/images.zarr")
    with progress("decode", total=3, unit="img") as bar:
        bar.advance(3)
    logging.getLogger("pipeline.distill.run").warning("no val split")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""  # stdout stays machine-readable
    assert lines[0] == "prepare: wrote /tmp/[x]/images.zarr"  # no markup, no wrapping, no padding
    assert lines[1].startswith("decode: 3 img in ") and lines[1].endswith(" img/s)")
    assert lines[2] == "warning: no val split" and len(lines) == 3


def test_library_alone_prints_no_status_lines(capsys):
    """Without the CLI's handler a status line is a log record only (Python shows WARNING and up)."""
    for lg in (logging.getLogger("pipeline"), logging.getLogger("stages")):
        lg.handlers[:] = [h for h in lg.handlers if h.get_name() != "kdpipe-console"]
        lg.setLevel(logging.NOTSET)
    logging.getLogger("pipeline.data.prepare").info("prepare: wrote something")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "flags, level",
    [([], logging.INFO), (["--quiet"], logging.WARNING), (["-q"], logging.WARNING), (["-v"], logging.DEBUG)],
)
def test_quiet_and_verbose_set_the_level_of_the_pipeline_loggers(flags, level):
    result = CliRunner().invoke(app, [*flags, "prepare", "--help"])
    assert result.exit_code == 0, result.output
    assert logging.getLogger("pipeline").level == level and logging.getLogger("stages").level == level


def test_quiet_and_verbose_together_are_refused():
    result = CliRunner().invoke(app, ["-q", "-v", "prepare", "--help"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_help_shows_the_set_metavar_and_the_environment_variables():
    top = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    assert "KDPIPE_PROGRESS" in top and "KDPIPE_FSYNC" in top
    sub = CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output
    assert "--set" in sub and "SECTION.KEY=VALUE" in sub
