"""Running `kdpipe` in-process the way a user does, and the contract of a refused input: exit 2, one line."""

from __future__ import annotations

from typer.testing import CliRunner

from stages.cli import app


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The one `error: ...` line of a command that refused its input: exit code 2, no exception escaped, no
    traceback, and the error is the last line on stderr (status lines, e.g. a bar's summary, may come before)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # exited on purpose, no exception escaped
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]
