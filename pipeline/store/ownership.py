"""What a writer may replace: kdpipe never deletes what it did not write.

Every output path a command takes or derives is `claim`ed before anything is written. It may be replaced when
nothing is there, when it is an empty file or directory of the right kind, or when it is recognisably the
writer's own earlier output; anything else stops the command with one line naming the path and what to do
(an `InputError`), and stays as it was. Replacement itself is whole and comes last (durable.atomic_path,
durable.atomic_dir), so even the writer's own output is never lost to a failed run.

An output kind (`Output`) says how its earlier output is recognised, in one (or two) of three ways:
- `recognise`: a format the output carries itself (a feature store's `format` attribute, an HDF5 file's
  `hdf5_format`, report.html's generator tag, the keys of metrics.json);
- `names`: a directory whose writer writes fixed names (plots/, a search index) is its own while it holds
  nothing else;
- `marker`: a directory of varying contents built by `atomic_dir` (an export, hf/) gets MARKER, a list of
  every file it holds; it is kdpipe's while it holds nothing more (a file a user added makes it the user's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

MARKER = ".kdpipe-output.json"  # in a directory built by atomic_dir for an Output(marker=True)
_MAX_RECOGNISED_BYTES = 64 << 20  # a recogniser reads at most this much: a larger file is not a small kdpipe file


@dataclass(frozen=True)
class Output:
    """A kind of output and how an existing one is recognised as its writer's own (see the module doc).

    `what` names it in messages ("a feature store", "an HDF5 export"); `directory`: whether it is one."""

    what: str
    directory: bool = False
    recognise: Callable[[Path], bool] | None = None
    names: frozenset[str] | None = None
    marker: bool = False

    def foreign(self, path: Path) -> str | None:
        """None when `path` (which exists, of the right kind, not empty) is this writer's own output, else why not."""
        listed = _listed(path, self.what) if self.marker else None
        if listed is not None:
            stray = _first_stray(path, listed, nested=True)
            return None if stray is None else f"holds {stray}, which kdpipe did not write there"
        if self.names is not None:
            stray = _first_stray(path, self.names, nested=False)
            if stray is None:
                return None
            if self.recognise is None:
                return f"holds {stray}, which kdpipe does not write there"
        if self.recognise is not None and _recognised(self.recognise, path):
            return None
        return f"is not {self.what} written by kdpipe"


def claim(path: Path | str, output: Output) -> None:
    """Refuse (InputError, one line) unless `path` may be replaced by the writer of `output` (module doc)."""
    path = Path(path)
    if not os.path.lexists(path):
        blocking = not_a_directory(path.parent)
        if blocking is not None:
            raise InputError(f"{blocking}: is a file, where the directory of {output.what} ({path}) goes; {_TODO}")
        return
    is_dir = path.is_dir()
    if is_dir != output.directory:
        found = "a directory" if is_dir else "a file" if path.exists() else "a broken symbolic link"
        raise InputError(f"{path}: is {found}, where {output.what} goes; {_TODO}")
    if (is_dir and not any(path.iterdir())) or (not is_dir and path.stat().st_size == 0):
        return
    why = output.foreign(path)
    if why is not None:
        raise InputError(f"{path}: exists and {why}; {_TODO}")


_TODO = "kdpipe replaces only what it wrote: move it away or choose another path"


def not_a_directory(directory: Path) -> Path | None:
    """The nearest existing one of `directory` and its parents, when it is not a directory (a file where a
    directory must be made); else None."""
    for d in (directory, *directory.parents):
        if os.path.lexists(d):
            return None if d.is_dir() else d
    return None


def write_marker(directory: Path, output: Output) -> None:
    """List every file under `directory` (built by atomic_dir, complete) in its MARKER, so that the next writer
    of `output` recognises the directory as its own."""
    files = sorted(p.relative_to(directory).as_posix() for p in _files(directory))
    (directory / MARKER).write_text(json.dumps({"written_by": output.what, "files": files}, indent=1) + "\n")


def _listed(path: Path, what: str) -> frozenset[str] | None:
    """The files MARKER lists, when `path` has a MARKER written for `what`."""
    try:
        doc = json.loads(read_small(path / MARKER))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("written_by") != what or not isinstance(doc.get("files"), list):
        return None
    return frozenset(str(f) for f in doc["files"]) | {MARKER}


def _first_stray(path: Path, allowed: frozenset[str], *, nested: bool) -> str | None:
    """The first entry of `path` not in `allowed`: top-level names, or (nested) every file's relative path."""
    if not nested:
        return next((e.name for e in sorted(path.iterdir()) if e.name not in allowed), None)
    return next((r for r in (p.relative_to(path).as_posix() for p in _files(path)) if r not in allowed), None)


def _files(directory: Path) -> list[Path]:
    """Every file under `directory`, symbolic links included (never followed)."""
    out = []
    for root, dirs, files in os.walk(directory):
        out += [Path(root) / n for n in files]
        out += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
    return out


def _recognised(recognise: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(recognise(path))
    except Exception:  # noqa: BLE001 -- a file its writer's reader cannot make sense of is not that writer's
        return False


# -- recognisers shared by several writers -------------------------------------------------------------------
def read_small(path: Path) -> bytes:
    """The bytes of a file a recogniser looks into (ValueError for one larger than any kdpipe file it means)."""
    if path.stat().st_size > _MAX_RECOGNISED_BYTES:
        raise ValueError(f"{path}: too large to be the file looked for")
    return path.read_bytes()


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """Recognises a JSON object holding every one of `keys` (the documents kdpipe writes: metrics.json, ...)."""

    def recognise(path: Path) -> bool:
        doc: Any = json.loads(read_small(path))
        return isinstance(doc, dict) and all(k in doc for k in keys)

    return recognise


def text_with(needle: str, within: int = 4096) -> Callable[[Path], bool]:
    """Recognises a text file whose first `within` bytes hold `needle` (a header, a generator tag)."""

    def recognise(path: Path) -> bool:
        with open(path, "rb") as f:
            return needle.encode("utf-8") in f.read(within)

    return recognise


def any_of(*names: str) -> Callable[[Path], bool]:
    """Recognises a directory holding at least one of `names` (the files only its writer names so)."""
    return lambda path: any((path / n).exists() for n in names)


__all__ = ["MARKER", "Output", "claim", "write_marker", "json_with_keys", "text_with", "any_of", "read_small"]
