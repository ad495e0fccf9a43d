"""Running a script under torchrun from a test, so that a hang ends the test instead of leaving ranks behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def run_ranks(
    command: list[str], *, env: dict[str, str], cwd: Path | None = None, timeout: float = 120.0
) -> tuple[int, str]:
    """Run torchrun; (exit code, stdout + stderr). Ranks that hang (one waiting in a collective that the other
    never joins) are stopped through torchrun's agent: SIGTERM, which it passes on to the ranks; a SIGKILL
    (what subprocess.run does on its timeout) would leave them orphaned (each rank runs in its own session),
    waiting for gloo's 30-minute timeout."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        pytest.fail(f"torchrun still running after {timeout} s (ranks out of step?); stopped:\n{out[-6000:]}")
    return proc.returncode, out
