"""Dataset readers: Karpathy split files, DSMD-style caption lists, and plain JSONL / CSV, into one DatasetIndex.

Formats (`prepare.dataset.format`):

- `karpathy`: `dataset_flickr30k.json` / `dataset_coco.json`: `{"images": [{"filename", "filepath"?,
  "split", "sentences": [{"raw", "imgid"?}, ...], "imgid"?, "cocoid"?}, ...]}`. The image path is
  `filepath/filename` when `filepath` is present (COCO: `val2014/COCO_val2014_...jpg`), else `filename`
  (Flickr30K). Any number of captions per image. Splits `train`, `restval`, `val`, `test`; `restval`
  goes into `train` by default (`restval: train`), or stays its own split (`restval`), or is dropped.
- `dsmd`: a JSON list of `{"filename": ..., "description": ...}` rows, one caption per row (a list of
  strings is also accepted as several captions); rows with the same filename are one image.
- `jsonl`: one JSON object per line, `{"image": path, "caption": text, "split"?: name}`.
- `csv`: a header row with columns `image`, `caption` and optionally `split`.
- `coco`: COCO captions JSON (`captions_val2017.json`): `{"images": [{"id", "file_name"}, ...],
  "annotations": [{"image_id", "caption"}, ...]}`, what pycocotools and CLIP_benchmark read. Images in the
  order of `images` (one without annotations is an unpaired image), captions in the order of `annotations`.
  The file has no split: give `annotations` as a mapping split -> file, or set `default_split`. COCO 2017
  keeps each split's images in a directory of its own: `image_root` may then be a mapping split -> directory
  too (the index's root is their common parent, and ids are `train2017/000000391895.jpg`).
- `folder`: `annotations` is a directory (or a mapping split -> directory); every image file under it
  (recursively, IMAGE_EXTENSIONS, hidden files skipped, sorted) with a same-name `.txt` beside it
  (`a/b.jpg` + `a/b.txt`, one caption per line, blank lines skipped) is captioned, one without is unpaired;
  a `.txt` without its image, or one image name with two images (`b.jpg`, `b.png`), is an error. Image ids
  are paths relative to image_root (default: the directory, or the mapping's common parent).
- `parquet`: pipeline/data/parquet_rows.py (columns set by `prepare.dataset.parquet`).
- `webdataset`: tar shards, read in place: pipeline/data/webdataset.py (`prepare.dataset.webdataset`).
  Default image_root: the common parent directory of the shards.

`annotations` is one path, a glob (`shards/*.tar`, `data/train-*.parquet`: sorted), a list of paths or globs,
or a mapping split -> any of these.

Splits of the row formats (`dsmd`, `jsonl`, `csv`): `annotations` is either one file, where each row's
`split` key/column names its split and rows without one go to `default_split` (unset by default, so a
missing split is an error rather than a silent guess), or a mapping `{split: file}` (DSMD ships one file
per split), where every row of a file belongs to that split and a row's own `split`, if any, must agree.

Image ids: the image's path relative to `image_root` exactly as the annotations give it, normalized
(`posixpath.normpath`, forward slashes), e.g. `1000092795.jpg` for Flickr30K and
`val2014/COCO_val2014_000000391895.jpg` for COCO. It is unique by construction (it names a file), stable
across versions of the split file (unlike Flickr's `imgid`, which is a position in the file), the same
rule for every format, and it is what the feature store records as `image_id`. Absolute paths in row
formats are kept absolute.

Unpaired items (distillation learns from them through the teacher's features, see pipeline.data.index):
- `karpathy`: an image with `"sentences": []` is an unpaired image (a missing `sentences` key is still an
  error: it is more likely a broken file than a choice).
- `jsonl` / `csv`: a row whose caption field is EMPTY (`""`, or JSON `null`) is an unpaired image; a row
  whose image field is empty is an unpaired text of its row's split. The keys themselves stay required in
  JSONL (a misspelt key must not silently turn a dataset into unpaired images). A row with neither is an
  error.
- `prepare.dataset.unlabelled_images: DIR` adds every image file under DIR (recursively; extensions in
  IMAGE_EXTENSIONS, case-insensitive; hidden files and directories skipped) as unpaired images of split
  `unlabelled_split` (default `train`), in sorted order of their path relative to DIR (deterministic
  whatever the file system lists). Their ids follow the rule below (relative to image_root when DIR is
  inside it, else absolute). An image the annotations already list in the same split is kept once (with
  its captions); one listed in ANOTHER split is an error (a test image must never become training data).
Rule for empty captions: "no caption" is accepted only where the format has a way to say it on purpose
(an empty `sentences` list; an empty caption field of a row format). A caption that is present but blank
(whitespace only) is still refused as a mistake, and so is an empty `raw` sentence in a Karpathy file or
an empty `description` in a DSMD file: those formats have no notation for an image without a caption.

Order: images in order of first appearance in the annotations (then the unlabelled folder), captions and
unpaired texts in file order. Every problem (missing file, malformed JSON/CSV, a blank caption, a caption
that names another image, an image listed twice, a row without an image or a split) is one `InputError`
naming the file and the item.
"""

from __future__ import annotations

import csv
import glob
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.data.index import DatasetIndex
from pipeline.data.parquet_rows import ParquetOptions
from pipeline.data.webdataset import WebDatasetOptions
from pipeline.errors import InputError
from pipeline.text_files import parse_json, read_json

KARPATHY_SPLITS = ("train", "restval", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class DatasetConfig:
    """Section `prepare.dataset`."""

    # one annotations file (a path or a glob), a list of them, or (not karpathy) a mapping split -> either
    annotations: Path | tuple[Path, ...] | dict[str, Path | tuple[Path, ...]]
    name: str = "dataset"
    format: Literal["karpathy", "dsmd", "jsonl", "csv", "coco", "folder", "parquet", "webdataset"] = "karpathy"
    # directory that image paths are relative to; None = the annotations' directory (folder, webdataset: the
    # common parent of all of them); coco only: a mapping split -> directory (see the module doc)
    image_root: Path | dict[str, Path] | None = None
    restval: Literal["train", "restval", "drop"] = "train"  # Karpathy's restval split: into train, kept, or dropped
    splits: tuple[str, ...] | None = None  # keep only these splits (after restval mapping); None = all
    default_split: str | None = None  # row formats: split of rows that name none; None = such a row is an error
    # ignore: pixels as stored, as the reference loaders (and published Flickr30K/COCO numbers); apply: turn
    # images upright by their EXIF orientation tag (phone photos). Recorded in the index, used by every stage.
    exif_orientation: Literal["ignore", "apply"] = "ignore"
    unlabelled_images: Path | None = None  # a folder of images without captions, added as unpaired images
    unlabelled_split: str = "train"  # the split those images go to
    webdataset: WebDatasetOptions = field(default_factory=WebDatasetOptions)  # format webdataset only
    parquet: ParquetOptions = field(default_factory=ParquetOptions)  # format parquet only

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if not self.unlabelled_split.strip():
            raise ValueError("unlabelled_split must not be empty")
        if self.unlabelled_images is not None and self.splits is not None and self.unlabelled_split not in self.splits:
            raise ValueError(f"unlabelled_split {self.unlabelled_split!r} is not among splits {list(self.splits)}")
        if isinstance(self.annotations, dict):
            if self.format == "karpathy":
                raise ValueError("annotations: a Karpathy split file is one file, not a mapping split -> file")
            if not self.annotations:
                raise ValueError("annotations: the mapping split -> file is empty")
        if self.splits is not None and not self.splits:
            raise ValueError("splits: an empty list keeps nothing; leave it unset to keep every split")
        if isinstance(self.image_root, dict):
            if self.format != "coco":
                raise ValueError("image_root: a mapping split -> directory is for format coco only")
            if not isinstance(self.annotations, dict) or set(self.image_root) != set(self.annotations):
                raise ValueError("image_root: a mapping needs annotations mapped by the same splits")

    @property
    def annotation_files(self) -> list[tuple[Path, str | None]]:
        """(file, split of all its rows or None), globs expanded (sorted); one InputError for a glob that
        matches nothing."""
        given = self.annotations.items() if isinstance(self.annotations, dict) else [(None, self.annotations)]
        out = []
        for split, paths in given:
            for path in paths if isinstance(paths, tuple) else (paths,):
                out.extend((found, split) for found in _expand(Path(path)))
        if self.format == "karpathy" and len(out) != 1:
            raise InputError(f"prepare.dataset.annotations: a Karpathy split file is one file, got {len(out)}")
        return out

    @property
    def resolved_image_root(self) -> Path:
        if isinstance(self.image_root, dict):
            return Path(os.path.commonpath([os.path.abspath(p) for p in self.image_root.values()]))
        if self.image_root is not None:
            return Path(self.image_root)
        files = self.annotation_files
        if self.format == "folder":
            return Path(os.path.commonpath([os.path.abspath(f) for f, _ in files]))
        if self.format == "webdataset":
            return Path(os.path.commonpath([os.path.abspath(f.parent) for f, _ in files]))
        return files[0][0].parent


def _expand(path: Path) -> list[Path]:
    """A path as it is, or the files a glob in it matches, sorted."""
    if not glob.has_magic(str(path)):
        return [path]
    found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not found:
        raise InputError(f"prepare.dataset.annotations: {path} matches no file")
    return found


def read_dataset(cfg: DatasetConfig) -> DatasetIndex:
    """Read the annotations of `cfg` into a DatasetIndex (images not opened; prepare decodes them)."""
    want_dir = cfg.format == "folder"
    for path, _ in cfg.annotation_files:
        if not (path.is_dir() if want_dir else path.is_file()):
            what = (
                "not found"
                if not path.exists()
                else "is a file, not a directory"
                if want_dir
                else "is a directory, not a file"
            )
            raise InputError(f"prepare.dataset.annotations: {path} {what}")
    roots = cfg.image_root.values() if isinstance(cfg.image_root, dict) else [cfg.resolved_image_root]
    for root in map(Path, roots):
        if not root.is_dir():
            raise InputError(
                f"prepare.dataset.image_root: {root} {'is not a directory' if root.exists() else 'not found'}"
            )
    root = cfg.resolved_image_root

    builder = _Builder(cfg)
    if cfg.format == "karpathy":
        _read_karpathy(cfg.annotation_files[0][0], builder)
    elif cfg.format in ("coco", "folder", "parquet", "webdataset"):
        from pipeline.data.more_readers import READERS  # they build on this module's _Builder

        for path, file_split in cfg.annotation_files:
            READERS[cfg.format](path, file_split, root, builder)
    else:
        reader = {"dsmd": _dsmd_rows, "jsonl": _jsonl_rows, "csv": _csv_rows}[cfg.format]
        unpaired_ok = cfg.format != "dsmd"  # DSMD rows have no notation for a caption without an image
        for path, file_split in cfg.annotation_files:
            for where, image, captions, split in reader(path):
                builder.add_row(where, image, captions, split, file_split, unpaired_ok=unpaired_ok)
    if cfg.unlabelled_images is not None:
        _add_unlabelled_folder(Path(cfg.unlabelled_images), root, cfg.unlabelled_split, builder)
    return builder.build(root)


# -- building ----------------------------------------------------------------------------------------
class _Builder:
    """Collects images (first appearance order) and captions, checking each item as it comes."""

    def __init__(self, cfg: DatasetConfig) -> None:
        self.cfg = cfg
        self.images: list[tuple[str, str, str]] = []  # (id, path, split)
        self.members: list[tuple[str, str, int, int]] = []  # (container, member, offset, length) per image
        self.row_of: dict[str, int] = {}
        self.where_of: dict[str, str] = {}
        self.captions: list[tuple[str, int]] = []
        self.unpaired_texts: list[tuple[str, str]] = []  # (text, split)

    def add_image(
        self,
        where: str,
        path: str,
        split: str,
        *,
        image_id: str | None = None,
        member: tuple[str, str, int, int] = ("", "", -1, -1),
        unique: bool = False,
    ) -> int:
        """The row of image `path` (a file, or with `member` the container holding it), added if new. Its id
        is its normalized path unless given; `unique`: an id seen before is an error (the image is listed twice)."""
        path = _normalize_path(path, where)
        image_id = path if image_id is None else image_id
        row = self.row_of.get(image_id)
        if row is not None and unique:
            raise InputError(f"{where}: image {image_id!r} is listed twice (also at {self.where_of[image_id]})")
        if row is not None:
            if self.images[row][2] != split:
                raise InputError(
                    f"{where}: image {image_id!r} is in split {split!r} here but in split "
                    f"{self.images[row][2]!r} at {self.where_of[image_id]}"
                )
            return row
        row = self.row_of[image_id] = len(self.images)
        self.where_of[image_id] = where
        self.images.append((image_id, path, split))
        self.members.append(member)
        return row

    def add_caption(self, where: str, text: Any, row: int | None, split: str | None = None) -> None:
        """A caption of image `row`, or (row None) an unpaired text of `split`."""
        if not isinstance(text, str):
            raise InputError(f"{where}: caption must be a string, got {type(text).__name__} {text!r}")
        if not text.strip():
            of = f"image {self.images[row][0]!r}" if row is not None else "a row without an image"
            raise InputError(f"{where}: empty caption for {of}")
        if row is None:
            self.unpaired_texts.append((text, split))
        else:
            self.captions.append((text, row))

    def add_row(
        self,
        where: str,
        image: Any,
        captions: list[Any],
        split: Any,
        file_split: str | None,
        *,
        unpaired_ok: bool = False,
        **where_in: Any,
    ) -> None:
        """`image` None (row formats: an empty image field) makes the captions unpaired texts when
        `unpaired_ok`; an empty `captions` list makes the image an unpaired image. `image` keywords go to
        add_image (`where_in`: an image inside a container, its id, uniqueness)."""
        if image is None and unpaired_ok:
            if not captions:
                raise InputError(f"{where}: row has neither an image nor a caption")
        elif not isinstance(image, str) or not image.strip():
            raise InputError(f"{where}: no image path (got {image!r})")
        if split is not None and not isinstance(split, str):
            raise InputError(f"{where}: split must be a string, got {split!r}")
        if split is not None and not split.strip():
            split = None
        if file_split is not None:
            if split is not None and split != file_split:
                raise InputError(f"{where}: row says split {split!r} but its file is the {file_split!r} file")
            split = file_split
        if split is None:
            split = self.cfg.default_split
            if split is None:
                raise InputError(
                    f"{where}: row has no split; add a split column/key, give annotations as a "
                    "mapping split -> file, or set prepare.dataset.default_split"
                )
        split = self._map_split(split)
        if split is None:
            return
        row = None if image is None else self.add_image(where, image, split, **where_in)
        for text in captions:
            self.add_caption(where, text, row, split)

    def _map_split(self, split: str) -> str | None:
        """Apply the restval rule and the splits filter; None = leave this item out."""
        if split == "restval":
            split = {"train": "train", "restval": "restval", "drop": None}[self.cfg.restval]
        if split is None or (self.cfg.splits is not None and split not in self.cfg.splits):
            return None
        return split

    def build(self, root: Path) -> DatasetIndex:
        files = ", ".join(str(p) for p, _ in self.cfg.annotation_files)
        if not self.images:
            where = f" in splits {', '.join(self.cfg.splits)}" if self.cfg.splits else ""
            raise InputError(f"{files}: no images{where}")
        present = {s for _, _, s in self.images}
        if self.cfg.splits is not None:
            missing = [s for s in self.cfg.splits if s not in present]
            if missing:
                raise InputError(
                    f"prepare.dataset.splits: {files} has no images in split {missing[0]!r} "
                    f"(it has {', '.join(sorted(present))})"
                )
        orphan = sorted({s for _, s in self.unpaired_texts} - present)
        if orphan:  # the image cache and the feature store are laid out per split of images
            raise InputError(f"{files}: unpaired texts in split {orphan[0]!r}, which has no images")
        return DatasetIndex.from_lists(
            self.cfg.name,
            root,
            self.images,
            self.captions,
            exif_orientation=self.cfg.exif_orientation,
            unpaired_texts=self.unpaired_texts,
            members=self.members,
        )


def _normalize_path(path: str, where: str) -> str:
    if "\0" in path:  # no file system takes one; os.stat would raise ValueError, not a file error
        raise InputError(f"{where}: image path {path!r} holds a NUL byte, which no file name can")
    p = path.strip().replace("\\", "/")
    absolute = p.startswith("/")
    p = posixpath.normpath(p)
    if not absolute and (p == "." or p.startswith("../") or p == ".."):
        raise InputError(f"{where}: image path {path!r} points outside the image root")
    return p


# -- Karpathy ----------------------------------------------------------------------------------------
def _read_karpathy(path: Path, builder: _Builder) -> None:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: not a Karpathy split file (expected an object with an 'images' list)")
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise InputError(f"{path} images[{i}]: expected an object, got {type(entry).__name__}")
        filename = entry.get("filename")
        where = f"{path} images[{i}]" + (f" ({filename})" if isinstance(filename, str) else "")
        if not isinstance(filename, str) or not filename.strip():
            raise InputError(f"{where}: no 'filename'")
        filepath = entry.get("filepath")
        if filepath is not None and not isinstance(filepath, str):
            raise InputError(f"{where}: 'filepath' must be a string, got {filepath!r}")
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            raise InputError(f"{where}: split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):  # [] is an unpaired image; a missing list is a broken entry
            raise InputError(f"{where}: no 'sentences' list (use [] for an image without captions)")
        split = builder._map_split(split)
        if split is None:
            continue
        image_path = posixpath.join(filepath, filename) if filepath else filename
        n_before = len(builder.images)
        row = builder.add_image(where, image_path, split)
        if len(builder.images) == n_before:
            raise InputError(
                f"{where}: image {builder.images[row][0]!r} is listed twice "
                f"(also at {builder.where_of[builder.images[row][0]]})"
            )
        imgid = entry.get("imgid")
        for j, sentence in enumerate(sentences):
            swhere = f"{where} sentences[{j}]"
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise InputError(f"{swhere}: expected an object with 'raw'")
            if imgid is not None and sentence.get("imgid", imgid) != imgid:
                raise InputError(
                    f"{swhere}: caption points at imgid {sentence.get('imgid')!r}, "
                    f"but it is listed under image imgid {imgid!r}"
                )
            builder.add_caption(swhere, sentence["raw"], row)


# -- row formats: each yields (where, image, [captions], split or None) ------------------------------
Row = tuple[str, Any, list[Any], Any]


def _dsmd_rows(path: Path) -> Iterator[Row]:
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f'{path}: expected a JSON list of {{"filename", "description"}} rows')
    for i, item in enumerate(data):
        where = f"{path} [{i}]"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object, got {type(item).__name__}")
        if "description" not in item:
            raise InputError(f"{where}: no 'description'")
        desc = item["description"]
        yield where, item.get("filename"), desc if isinstance(desc, list) else [desc], item.get("split")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    try:
        fh = open(path, encoding="utf-8")
        with fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                item = parse_json(line, str(path), first_line=lineno)
                if not isinstance(item, dict):
                    raise InputError(f"{where}: expected an object, got {type(item).__name__}")
                if "caption" not in item:
                    raise InputError(f'{where}: no \'caption\' (use "caption": "" for an image without one)')
                if "image" not in item:
                    raise InputError(f'{where}: no image path (use "image": "" for a text without an image)')
                caption, image = item["caption"], item["image"]
                yield (
                    where,
                    (None if image in (None, "") else image),
                    ([] if caption in (None, "") else [caption]),
                    item.get("split"),
                )
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise InputError(f"{path}: empty CSV file (expected a header with image, caption[, split])") from None
            header = [h.strip() for h in header]
            missing = [c for c in ("image", "caption") if c not in header]
            if missing:
                raise InputError(
                    f"{path} line 1: no {missing[0]!r} column in the header {header} "
                    "(expected image, caption and optionally split)"
                )
            col = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
            for values in reader:
                where = f"{path} line {reader.line_num}"
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(f"{where}: {len(values)} fields, the header has {len(header)}")
                split = values[col["split"]] if "split" in col else None
                image, caption = values[col["image"]], values[col["caption"]]
                yield where, image or None, [caption] if caption else [], split
    except csv.Error as err:
        line = f" line {reader.line_num}" if reader is not None else ""
        raise InputError(f"{path}{line}: malformed CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# -- a folder of unlabelled images -------------------------------------------------------------------
def _add_unlabelled_folder(folder: Path, root: Path, split: str, builder: _Builder) -> None:
    where = f"prepare.dataset.unlabelled_images: {folder}"
    if not folder.is_dir():
        raise InputError(f"{where} {'is not a directory' if folder.exists() else 'not found'}")
    rel = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not rel:
        raise InputError(f"{where}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    base = folder.resolve()
    inside = base.is_relative_to(root.resolve())
    for name in rel:
        path = (base / name).relative_to(root.resolve()).as_posix() if inside else (base / name).as_posix()
        builder.add_image(f"{where} ({name})", path, split)
