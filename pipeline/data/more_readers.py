"""The readers of `prepare.dataset.format` coco, folder, parquet and webdataset (the formats are described in
pipeline/data/readers.py's docstring); each adds one annotations file (or folder, or shard) to the index builder.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from pipeline.data.parquet_rows import image_kind, parquet_rows
from pipeline.data.readers import IMAGE_EXTENSIONS, DatasetConfig, _Builder
from pipeline.data.webdataset import image_id as shard_image_id
from pipeline.data.webdataset import shard_samples
from pipeline.errors import InputError
from pipeline.text_files import read_json


# -- COCO captions JSON ------------------------------------------------------------------------------
def _read_coco(path: Path, file_split: str | None, root: Path, builder: _Builder) -> None:
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise InputError(f"{path}: not a COCO captions file (expected an object with 'images' and 'annotations' lists)")
    prefix = _split_prefix(builder.cfg, file_split, root)
    rows: dict[Any, int | None] = {}  # COCO image id -> index row (None: its split is left out)
    for i, entry in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int | str):
            raise InputError(f"{where}: expected an object with an 'id' (a number or a string) and 'file_name'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: no 'file_name' (got {name!r})")
        if entry["id"] in rows:
            raise InputError(f"{where}: image id {entry['id']!r} is listed twice")
        split = _file_split(builder.cfg, where, file_split)
        mapped = builder._map_split(split)
        rows[entry["id"]] = None if mapped is None else builder.add_image(where, prefix + name, mapped, unique=True)
    for j, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{j}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int | str) or "caption" not in ann:
            raise InputError(f"{where}: expected an object with 'image_id' (a number or a string) and 'caption'")
        if ann["image_id"] not in rows:
            raise InputError(f"{where}: image_id {ann['image_id']!r} is not among the file's images")
        row = rows[ann["image_id"]]
        if row is not None:
            builder.add_caption(where, ann["caption"], row)


def _file_split(cfg: DatasetConfig, where: str, file_split: str | None) -> str:
    """The split of every item of a file that has no split field: its mapping key, or default_split."""
    split = file_split or cfg.default_split
    if split is None:
        raise InputError(
            f"{where}: the file names no split; give annotations as a mapping split -> file, or set "
            "prepare.dataset.default_split"
        )
    return split


def _split_prefix(cfg: DatasetConfig, split: str | None, root: Path) -> str:
    """coco with image_root mapped per split: that split's directory relative to the common root, plus "/"."""
    if not isinstance(cfg.image_root, dict) or split is None:
        return ""
    rel = os.path.relpath(os.path.abspath(cfg.image_root[split]), os.path.abspath(root))
    return "" if rel == "." else rel.replace(os.sep, "/") + "/"


# -- a folder of images with same-name .txt captions -------------------------------------------------
def _read_folder(folder: Path, file_split: str | None, root: Path, builder: _Builder) -> None:
    split = _file_split(builder.cfg, f"prepare.dataset.annotations: {folder}", file_split)
    images: dict[str, list[str]] = {}  # path without extension -> image files
    texts: set[str] = set()
    for rel in _visible_files(folder):
        stem, ext = posixpath.splitext(rel)
        if ext.lower() in IMAGE_EXTENSIONS:
            images.setdefault(stem, []).append(rel)
        elif ext == ".txt":
            texts.add(stem)
    orphan = sorted(texts - set(images))
    if orphan:
        raise InputError(f"{folder / (orphan[0] + '.txt')}: a caption file without an image of the same name beside it")
    mapped = builder._map_split(split)
    if mapped is None:
        return
    base = _relative_to_root(folder, root)
    for stem in sorted(images):
        if len(images[stem]) > 1:
            raise InputError(
                f"{folder / stem}: {' and '.join(sorted(images[stem]))} share one name; which does {stem}.txt caption?"
            )
        rel = images[stem][0]
        where = f"{folder / rel}"
        row = builder.add_image(where, posixpath.join(base, rel), mapped, unique=True)
        if stem in texts:
            lines = _text_lines(folder / (stem + ".txt"))
            if not lines:
                raise InputError(
                    f"{folder / (stem + '.txt')}: empty caption file (delete it to leave {rel} without captions)"
                )
            for k, line in enumerate(lines):
                builder.add_caption(f"{folder / (stem + '.txt')} line {k + 1}", line, row)


def _visible_files(folder: Path) -> list[str]:
    """Every file under `folder` (recursively), hidden files and directories skipped, as sorted relative paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _text_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def _relative_to_root(path: Path, root: Path) -> str:
    """`path` relative to the image root as the index stores it ("." inside it), or absolute outside it."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == ".." or rel.startswith(".." + os.sep):
        return Path(path).resolve().as_posix()
    return rel.replace(os.sep, "/")


# -- parquet ----------------------------------------------------------------------------------------
def _read_parquet(path: Path, file_split: str | None, root: Path, builder: _Builder) -> None:
    options = builder.cfg.parquet
    held = image_kind(path, options) == "bytes"
    container = _relative_to_root(path, root)
    for r in parquet_rows(path, options):
        if held:
            image_id = r.image_id if r.image_id is not None else f"{posixpath.splitext(container)[0]}/{r.row}"
            where_in = {"image_id": image_id, "member": ("parquet", options.image_column, r.row, -1), "unique": True}
            builder.add_row(r.where, container, r.captions, r.split, file_split, unpaired_ok=True, **where_in)
        else:
            builder.add_row(r.where, r.image, r.captions, r.split, file_split, unpaired_ok=True)


# -- webdataset shards ------------------------------------------------------------------------------
def _read_shards(shard: Path, file_split: str | None, root: Path, builder: _Builder) -> None:
    split = _file_split(builder.cfg, f"prepare.dataset.annotations: {shard}", file_split)
    container = _relative_to_root(shard, root)
    for sample in shard_samples(shard, builder.cfg.webdataset):
        where_in = {
            "image_id": shard_image_id(container, sample.member),
            "member": ("tar", sample.member, sample.offset, sample.length),
            "unique": True,
        }
        builder.add_row(sample.where, container, sample.captions, split, None, **where_in)


READERS = {"coco": _read_coco, "folder": _read_folder, "parquet": _read_parquet, "webdataset": _read_shards}
