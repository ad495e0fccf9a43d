"""webdataset tar shards (img2dataset's output) as a dataset, read in place: `prepare.dataset.format: webdataset`.

A shard is an uncompressed tar whose members are grouped into samples by webdataset's rule
(`webdataset.tariterators.base_plus_ext`): a member `dir/000123.jpg` belongs to the sample with key
`dir/000123` (everything up to the first dot of the file name), extension `jpg` (the rest, lower-cased);
consecutive members with one key are one sample, names starting with `__` are webdataset's own metadata.
tests/test_webdataset.py checks this rule against the webdataset package itself.

Per sample: the image is the member whose extension is `image_key` (alternatives separated by `;`, first
present wins, as webdataset's `to_tuple("jpg;png")`); the captions come from the `caption_key` member: a
text member is one caption (a final newline dropped), a JSON member (`caption_key: json`) gives the value of
`caption_field`, one string or a list of strings (several captions; null or [] for none). A sample without
a caption member (or with none in its JSON) is an unpaired image; one without an image member is an error
naming what it has.

What the index records (pipeline/data/index.py): path = the shard, member = the image member's name, and
its data's byte offset and length in the shard (from the tar headers). Image id = the shard's path without
`.tar`, then the member's name: `shards/00000/000123.jpg`, i.e. the path the image would have if the shard
were untarred into a directory named after it. The tar's headers are read with Python's `tarfile` (random
access by seeking; webdataset itself only streams a shard from start to end), and only the caption members'
data is read; images are opened later, in the workers (pipeline/data/image_source.py).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.text_files import parse_json

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__-style members are not sample parts


@dataclass(frozen=True)
class WebDatasetOptions:
    """Section `prepare.dataset.webdataset` (as clip-retrieval's wds_image_key / wds_caption_key)."""

    image_key: str = "jpg"  # extension of the image member; alternatives separated by ";" ("jpg;png;webp")
    caption_key: str = "txt"  # extension of the caption member: text (one caption) or JSON (see caption_field)
    caption_field: str | None = None  # JSON caption member: its field holding a caption or a list of captions

    def __post_init__(self) -> None:
        if not [k for k in self.image_key.split(";") if k.strip()]:
            raise ValueError("image_key must name at least one extension, e.g. jpg")
        if not self.caption_key.strip():
            raise ValueError("caption_key must not be empty")
        if self.caption_key.lower().endswith("json") and not self.caption_field:
            raise ValueError(f"caption_key {self.caption_key!r} is JSON: set caption_field (e.g. captions)")

    @property
    def image_keys(self) -> list[str]:
        return [k.strip().lower() for k in self.image_key.split(";") if k.strip()]


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: where its image is, and its captions."""

    where: str  # "<shard> sample <key>" for error lines
    member: str  # the image member's name
    offset: int  # its data's first byte in the shard
    length: int  # its data's bytes
    captions: list[Any]  # [] for an unpaired image; checked (strings, not blank) by the index builder


def key_and_extension(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name into (sample key, extension); None for a name without one."""
    m = _KEY_EXT.match(name)
    return None if m is None else (m.group(1), m.group(2))


def shard_samples(shard: Path, options: WebDatasetOptions) -> Iterator[Sample]:
    """The samples of one shard, in the shard's order."""
    try:
        tar = tarfile.open(shard, mode="r:")  # "r:" = uncompressed only: a member is a byte range of the file
    except tarfile.ReadError as err:
        raise InputError(
            f"{shard}: not an uncompressed tar file ({err}); shards are read in place, so they cannot be "
            "compressed (gunzip a .tar.gz once)"
        ) from None
    except OSError as err:
        raise InputError(f"{shard}: cannot read the shard ({err.strerror or err})") from None
    with tar:
        seen: set[str] = set()
        key, parts = None, {}
        try:
            for info in tar:
                if not info.isfile() or _META.match(posixpath.basename(info.name)):
                    continue
                split = key_and_extension(info.name)
                if split is None:
                    continue  # webdataset skips a member without an extension too
                k, ext = split[0], split[1].lower()
                if k != key:
                    if key is not None:
                        yield _sample(shard, tar, key, parts, options)
                    if k in seen:
                        raise InputError(
                            f"{shard}: sample key {k!r} appears twice, apart (its members must be consecutive)"
                        )
                    seen.add(k)
                    key, parts = k, {}
                if ext in parts:
                    raise InputError(
                        f"{shard} sample {k}: two members with extension {ext!r} ({parts[ext].name}, {info.name})"
                    )
                parts[ext] = info
        except tarfile.TarError as err:
            raise InputError(f"{shard}: corrupt tar file ({err})") from None
        if key is not None:
            yield _sample(shard, tar, key, parts, options)


def _sample(
    shard: Path, tar: tarfile.TarFile, key: str, parts: dict[str, tarfile.TarInfo], options: WebDatasetOptions
) -> Sample:
    where = f"{shard} sample {key}"
    image = next((parts[k] for k in options.image_keys if k in parts), None)
    if image is None:
        raise InputError(
            f"{where}: no {options.image_key!r} member (it has: {', '.join(sorted(parts))}); "
            "set prepare.dataset.webdataset.image_key"
        )
    caption = parts.get(options.caption_key.lower())
    captions: list[Any] = [] if caption is None else _captions(where, tar, caption, options)
    return Sample(where, image.name, image.offset_data, image.size, captions)


def _captions(where: str, tar: tarfile.TarFile, info: tarfile.TarInfo, options: WebDatasetOptions) -> list[Any]:
    fh = tar.extractfile(info)
    data = fh.read() if fh is not None else b""
    if len(data) != info.size:
        raise InputError(f"{where}: member {info.name} is truncated (the shard ends inside it)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: member {info.name} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not options.caption_key.lower().endswith("json"):
        return [text[:-1] if text.endswith("\n") else text]  # one caption; a text file's final newline is no part of it
    doc = parse_json(text, f"{where}: member {info.name}")  # malformed or absurdly nested: one line
    if not isinstance(doc, dict) or options.caption_field not in doc:
        raise InputError(f"{where}: member {info.name} has no field {options.caption_field!r}")
    value = doc[options.caption_field]
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def image_id(shard_relative: str, member: str) -> str:
    """The id of a shard's image: the shard's path without .tar, then the member's name."""
    stem = shard_relative[: -len(".tar")] if shard_relative.endswith(".tar") else shard_relative
    return posixpath.normpath(posixpath.join(stem, member))


__all__ = ["WebDatasetOptions", "Sample", "shard_samples", "key_and_extension", "image_id"]
