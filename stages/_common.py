"""What every stage command shares: reading params.yaml, `--set` overrides, CPU threads, the one-writer lock
of its outputs, and turning errors into one line.

A stage command parses its options, calls `load_stage` for its typed config and artifact paths (which also
applies `runtime.threads`: `apply_runtime`), holds `writing(outputs)` while it calls the pipeline, and lets `run_stage` turn a `KdpipeError`, or a
machine-level failure (disk full, read-only path, out of memory: pipeline/system_errors.py), into one
red line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer

from pipeline.config import apply_overrides, from_dict, write_resolved
from pipeline.errors import ConfigError, KdpipeError
from pipeline.locks import never_waiting, output_lock
from pipeline.paths import ArtifactPaths
from pipeline.printable import MESSAGE_LIMIT, printable
from pipeline.runtime import RuntimeConfig, apply_threads
from pipeline.system_errors import environment_error
from pipeline.text_files import parse_yaml

T = TypeVar("T")

# Top-level keys of params.yaml: the work directory, the CPU runtime of every stage, one section per stage,
# and `store` (how distill and evaluate read the feature store, stages/_store.py). Anything else is a typo.
TOP_LEVEL_KEYS = (
    "workdir",
    "runtime",
    "fit_teacher",
    "fit_cross_encoder",
    "prepare",
    "extract",
    "views",
    "mine",
    "distill",
    "evaluate",
    "store",
)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Parameters file (YAML), one section per stage.")
SET_OPTION = typer.Option(
    None,
    "--set",
    metavar="SECTION.KEY=VALUE",
    help="Override a parameter of params.yaml, e.g. distill.epochs=3 (repeatable; nested keys: a.b.c=value).",
)
WORKDIR_OPTION = typer.Option(None, "--workdir", help="Artifact directory (default: params.yaml's workdir).")
NO_WAIT_OPTION = typer.Option(
    False, "--no-wait", help="If another run is writing the same output, stop at once (naming it) instead of waiting."
)


def load_params(path: Path) -> dict[str, Any]:
    """Read a params YAML file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    data = parse_yaml(text, str(path))  # malformed, too deep, or an alias bomb: one ConfigError
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_stage(
    params_path: Path, section: str, cls: type[T], overrides: list[str] | None, workdir: Path | None = None
) -> tuple[T, ArtifactPaths]:
    """The typed config of `section` and the artifact paths, after `--set` overrides.

    Every section of the file is checked for unknown top-level keys, so a typo anywhere fails early."""
    raw = load_raw(params_path, overrides)
    cfg = from_dict(cls, raw.get(section), section)
    apply_runtime(raw, getattr(cfg, "num_workers", None) or 0)
    return cfg, artifact_paths(raw, params_path, workdir)


def ablation_stage(params: Path, overrides: list[str] | None, ablation: Path, section: str, cls: type[T]):
    """(the typed `section` an ablation's own stage runs with: params.yaml's, the ablation's keys of that name merged
    in; the ablation's artifact paths): `kdpipe mine / fit-teacher / extract --ablation FILE`."""
    from pipeline.paths import ArtifactPaths
    from pipeline.runs import ablation_stage_section
    from stages._ablation import load_ablation

    abl = load_ablation(ablation)
    raw = load_raw(params, overrides).get(section)
    return from_dict(cls, ablation_stage_section(section, raw, abl), section), ArtifactPaths(abl.workdir)


def apply_runtime(raw: dict[str, Any], loader_workers: int = 0) -> int:
    """Set this process's intra-op CPU threads from the params file's `runtime` section (pipeline/runtime.py):
    every stage calls it once its config is known, since the default leaves room for its loader workers."""
    return apply_threads(from_dict(RuntimeConfig, raw.get("runtime"), "runtime"), loader_workers)


def load_raw(params_path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """The params file after `--set` overrides, its top-level keys checked (for stages that reshape a section
    before typing it, as distill does with `distill.runs`)."""
    raw = apply_overrides(load_params(params_path), list(overrides or []))
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{params_path}: unknown section {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    return raw


def artifact_paths(raw: dict[str, Any], params_path: Path, workdir: Path | None = None) -> ArtifactPaths:
    if workdir is not None:
        return workdir_paths(workdir, "--workdir")
    if not raw.get("workdir"):
        raise ConfigError(f"{params_path}: workdir is not set (e.g. workdir: artifacts/demo)")
    return workdir_paths(raw["workdir"], f"{params_path}: workdir")


def workdir_paths(workdir: Any, where: str) -> ArtifactPaths:
    """The artifact paths under `workdir` (from `where`: --workdir or the params file), refused in one line when
    it cannot be a directory: not a path, a NUL byte in it, or it (or a parent) is an existing file."""
    if not isinstance(workdir, (str, Path)) or "\0" in str(workdir):
        raise ConfigError(f"{where}: {workdir!r} is not a usable directory path")
    workdir = Path(workdir)
    for p in (workdir, *workdir.parents):
        if p.is_dir():
            break
        if p.exists():
            parent = "" if p == workdir else f" (in its path, {p})"
            raise ConfigError(
                f"{where}: {workdir} cannot be a directory: a file stands there{parent}; choose another workdir"
            )
    return ArtifactPaths(workdir)


def save_resolved(cfg: Any, paths: ArtifactPaths, section: str) -> None:
    """Record the config a stage actually ran with, next to its outputs."""
    write_resolved(cfg, paths.resolved_config(section), section)


def run_stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for stage commands: a user error or a machine-level failure becomes one red line and exit code
    2, never a traceback; anything else (a bug) keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdpipeError as err:
            error_line(err)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None
        except (OSError, MemoryError, RuntimeError) as err:  # RuntimeError: torch's CUDA out-of-memory
            problem = environment_error(err)
            if problem is None:
                raise  # a bug: keep the traceback
            error_line(problem)
            raise typer.Exit(2) from None

    return wrapper


def error_line(err: BaseException | str, prefix: str = "error") -> None:
    """`<prefix>: <message>` as one red line on stderr: control characters shown as escapes, and a message
    that quotes a huge value cut to MESSAGE_LIMIT characters (pipeline/printable.py)."""
    typer.secho(f"{prefix}: {printable(err, MESSAGE_LIMIT)}", fg=typer.colors.RED, err=True)


@contextmanager
def writing(*outputs: Path, no_wait: bool = False) -> Iterator[None]:
    """Hold the one-writer lock of each output (pipeline/locks.py) for the body.

    Under torchrun only rank 0 locks, for the whole job: call this before the process group is joined,
    so the other ranks of a job that waits block in the rendezvous until their rank 0 holds the lock."""
    with ExitStack() as stack:
        if no_wait:  # the command's inputs too: it refuses rather than wait for a run rewriting one
            stack.enter_context(never_waiting())
        if is_main_process():
            for out in sorted({Path(o).resolve() for o in outputs}):  # one order: two runs never deadlock
                stack.enter_context(output_lock(out))
        yield


def is_main_process() -> bool:
    """True unless this is a non-zero torchrun rank (only rank 0 prints summaries and writes shared files)."""
    return int(os.environ.get("RANK", "0")) == 0


def echo(message: str) -> None:
    """One line on stdout, its control characters shown as escapes (ids and captions come from user files)."""
    print(printable(message), file=sys.stdout, flush=True)
