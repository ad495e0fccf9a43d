"""The mined store, `mined.zarr` (format "kdpipe-mined", version 1): the teacher's nearest neighbours of every
caption and image over the whole bank, and a cross-encoder's scores on them. Written by `kdpipe mine`.

    mined.zarr/
      zarr.json   attrs: format="kdpipe-mined", version=1, complete, k, splits=[...],
                  source={dataset: {name, fingerprint}, teacher: {...}, teacher_arrays: sha256},
                  mine={chunk_rows, score}, cross_encoder={identity, device_type, compute_dtype} | null
      <split>/text_to_image/rows       int32   [M, K]    image rows, descending teacher similarity (ties: lower
                                                         row first); the caption's own image is never among them
      <split>/text_to_image/sims       float16 [M, K]    their similarities: the exact inner product of the
                                                         stored float16 rows, rounded once to float16
      <split>/text_to_image/ce_scores  float32 [M, 1+K]  OPTIONAL: the cross-encoder's logit that the pair
                                                         matches; column 0 the caption's own image, then rows
      <split>/image_to_text/rows       int32   [N, K]    caption rows; none of the image's own captions
      <split>/image_to_text/sims       float16 [N, K]
      <split>/image_to_text/ce_scores  float32 [N, K]    OPTIONAL: the same for the image's K captions

Rows index the feature store's arrays of the same split (`<split>/image_emb`, `<split>/text_emb`); M and N are
that split's caption and image counts (unpaired images are images: they are candidates and queries too; the
store's unpaired texts are neither). `source` ties the file to the rows it was mined from: the store's dataset
fingerprint, its teacher identity, and `teacher_arrays`, a sha256 over the chunk checksums that the store
records for image_emb, text_emb and text_image of every mined split (pipeline/store/checksums.py). A reader
(`open_mined`) compares it with the store it is given, so candidates mined from another store (another
teacher, another dataset, re-extracted rows) are refused, never used.

A separate group, not arrays inside features.zarr: DVC forbids two stages writing one output, and mining
settings must be changeable without touching extraction. Arrays are raw (no compressor, `bytes` codec) and
chunked along rows only, with per-chunk sha256 checksums in each array's attrs, as the feature store's, so
`np.memmap` maps them and plain zarr reads them:

    g = zarr.open_group("mined.zarr", mode="r"); assert g.attrs["complete"]
    hard = g["train/text_to_image/rows"][:]    # [M, K] image rows of each caption's hardest negatives
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.locks import read_lock
from pipeline.store import checksums
from pipeline.store.chunk_files import chunk_file, map_rows
from pipeline.store.durable import fsync_dir, fsync_file
from pipeline.store.features import FeatureStore, read_attrs
from pipeline.store.features_writer import chunk_len, jsonable
from pipeline.store.ownership import Output

FORMAT = "kdpipe-mined"
VERSION = 1
TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_to_image", "image_to_text"
DIRECTIONS = (TEXT_TO_IMAGE, IMAGE_TO_TEXT)
ARRAY_DTYPES = {"rows": "int32", "sims": "float16", "ce_scores": "float32"}
WORK_DIR = ".mine"  # kdpipe mine's resumption records inside the store it writes
SOURCE_ARRAYS = ("image_emb", "text_emb", "text_image")  # the store arrays whose rows the candidates index


def store_source(store: FeatureStore, splits: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What a mined store is tied to: the feature store's dataset, teacher, and the checksums of its rows."""
    import zarr

    sums = {}
    for split in splits:
        store.split(split)  # one line when the store lacks it
        for key in SOURCE_ARRAYS:
            arr = zarr.open_array(str(store.path / split / key), mode="r")
            recorded = checksums.recorded(f"{store.path}: {split}/{key}", arr)
            if recorded is None:
                raise InputError(
                    f"{store.path}: {split}/{key} records no chunk checksums (a store from an older kdpipe); "
                    "mined candidates are tied to them: rerun `kdpipe extract --fresh`"
                )
            sums[f"{split}/{key}"] = recorded
    digest = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()
    return jsonable({"dataset": store.dataset, "teacher": store.teacher, "teacher_arrays": digest})


def shapes(k: int, n_images: int, n_captions: int, scores: bool) -> dict[tuple[str, str], tuple[int, int]]:
    """(direction, array) -> [rows, columns] of one split's arrays."""
    out = {}
    for direction, n in ((TEXT_TO_IMAGE, n_captions), (IMAGE_TO_TEXT, n_images)):
        out[direction, "rows"] = (n, k)
        out[direction, "sims"] = (n, k)
        if scores:
            out[direction, "ce_scores"] = (n, k + 1 if direction == TEXT_TO_IMAGE else k)
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
class MinedWriter:
    """Creates the group (complete=false) and writes chunk files one at a time, durably, each returning its
    sha256; `finish` records the checksums and sets complete=true last."""

    def __init__(self, path: Path | str) -> None:
        import zarr

        self.path = Path(path)
        attrs = read_attrs(self.path)
        if attrs is None or attrs.get("format") != FORMAT:
            raise InputError(f"{self.path}: no mined-store metadata to write into")
        group = zarr.open_group(str(self.path), mode="r+")
        self._arrays: dict[tuple[str, str, str], Any] = {}
        for split in attrs["splits"]:
            for direction in DIRECTIONS:
                for name in ARRAY_DTYPES:
                    key = f"{split}/{direction}/{name}"
                    if key in group:
                        self._arrays[split, direction, name] = group[key].with_config({"write_empty_chunks": True})

    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        layout: dict[str, tuple[int, int]],
        k: int,
        scores: bool,
        chunk_rows: int,
        attrs: dict[str, Any],
    ) -> MinedWriter:
        """A new group at `path` (which must be empty or absent) for {split: (n_images, n_captions)}."""
        import zarr

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        head = {"format": FORMAT, "version": VERSION, "complete": False, "k": int(k), "splits": list(layout)}
        root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=jsonable({**head, **attrs}))
        for split, (n_images, n_captions) in layout.items():
            for (direction, name), (n, width) in shapes(k, n_images, n_captions, scores).items():
                root.create_array(
                    f"{split}/{direction}/{name}",
                    shape=(n, width),
                    chunks=(chunk_len(n, chunk_rows), width),
                    dtype=ARRAY_DTYPES[name],
                    filters=None,
                    compressors=None,
                    fill_value=0,
                    config={"write_empty_chunks": True},
                )
        return cls(path)

    def chunk_range(self, split: str, direction: str, i: int) -> tuple[int, int]:
        arr = self._arrays[split, direction, "rows"]
        cr, n = int(arr.chunks[0]), int(arr.shape[0])
        return i * cr, min(n, (i + 1) * cr)

    def n_chunks(self, split: str, direction: str) -> int:
        arr = self._arrays[split, direction, "rows"]
        return -(-int(arr.shape[0]) // int(arr.chunks[0])) if arr.shape[0] else 0

    def read(self, split: str, direction: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of an array as written so far (only chunks already written may be read)."""
        return np.asarray(self._arrays[split, direction, name][start:stop])

    def write_chunk(self, split: str, direction: str, name: str, i: int, values: np.ndarray) -> str:
        """Chunk i of an array (rows of chunk_range), durably; returns the chunk file's sha256."""
        arr = self._arrays[split, direction, name]
        start, stop = self.chunk_range(split, direction, i)
        values = np.asarray(values)
        if values.shape != (stop - start, int(arr.shape[1])) or values.dtype != np.dtype(ARRAY_DTYPES[name]):
            raise ValueError(f"{split}/{direction}/{name} chunk {i}: got {values.dtype} {values.shape}")
        arr[start:stop] = values
        f = chunk_file(arr, (i, 0))
        digest = sha256_file(f)
        fsync_file(f)
        fsync_dir(f.parent)
        return digest

    def finish(self, digests: dict[tuple[str, str, str], dict[int, str]], **attrs: Any) -> None:
        """Record every chunk's checksum ({(split, direction, array): {chunk: sha256}}), then the attrs with
        complete=true. Refuses (a bug, not a user error) when a chunk has none."""
        import zarr

        for key, arr in self._arrays.items():
            found = digests.get(key, {})
            keys = checksums.chunk_keys(arr)
            if len(found) != len(keys):
                raise RuntimeError(f"{self.path}: {'/'.join(key)} has {len(found)} of {len(keys)} chunk checksums")
            checksums.record(self.path.joinpath(*key), {keys[i]: d for i, d in found.items()})
        zarr.open_group(str(self.path), mode="r+").attrs.update(jsonable({**attrs, "complete": True}))
        fsync_file(self.path / "zarr.json")
        fsync_dir(self.path)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MinedDirection:
    rows: np.ndarray  # int32 [R, K] read-only memory map
    sims: np.ndarray  # float16 [R, K]
    ce_scores: np.ndarray | None  # float32 [R, 1+K] (text_to_image) or [R, K]; None: not scored


@dataclass(frozen=True)
class MinedSplit:
    name: str
    text_to_image: MinedDirection
    image_to_text: MinedDirection


class MinedStore:
    def __init__(self, path: Path, attrs: dict[str, Any], splits: dict[str, MinedSplit]) -> None:
        self.path, self.attrs, self._splits = path, attrs, splits
        self.k: int = int(attrs["k"])
        self.splits = tuple(splits)
        self.cross_encoder: dict[str, Any] | None = attrs.get("cross_encoder")

    def split(self, name: str) -> MinedSplit:
        if name not in self._splits:
            raise InputError(
                f"{self.path}: no split {name!r} was mined; it has {', '.join(self.splits) or 'none'} "
                "(mine.splits in params.yaml)"
            )
        return self._splits[name]


def open_mined(path: Path | str, store: FeatureStore, *, wait: bool | None = None) -> MinedStore:
    """Open a complete mined store, checked against `store` (the feature store its rows index): its source,
    every array's shape and dtype, every row index in range and never the query's own, all values finite.
    Any problem is one InputError line."""
    path = Path(path)
    with read_lock(path, wait=wait):
        return _open(path, store)


def _open(path: Path, store: FeatureStore) -> MinedStore:
    if not path.is_dir():
        raise InputError(
            f"{path}: no mined store here (directory not found); run `kdpipe mine` (or `dvc repro mine`) first"
        )
    attrs = read_attrs(path)
    if attrs is None or attrs.get("format") != FORMAT:
        raise InputError(f"{path}: not a kdpipe mined store (format={(attrs or {}).get('format')!r})")
    if attrs.get("version") != VERSION:
        raise InputError(f"{path}: mined store version {attrs.get('version')!r}; this kdpipe reads version {VERSION}")
    if attrs.get("complete") is not True:
        raise InputError(
            f"{path}: the mined store is incomplete (interrupted or running); rerun `kdpipe mine` (or `dvc repro mine`)"
        )
    k, names = attrs.get("k"), attrs.get("splits")
    if not isinstance(k, int) or k < 1 or not isinstance(names, list):
        raise InputError(f"{path}: attributes k={k!r} / splits={names!r} are malformed")
    if attrs.get("source") != store_source(store, names):
        raise InputError(
            f"{path}: mined from other teacher rows than {store.path} holds now (another teacher, dataset or "
            "extraction); rerun `kdpipe mine` (or `dvc repro mine`)"
        )
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 -- any zarr failure is a broken store for the user
        raise InputError(f"{path}: cannot open the Zarr group ({type(err).__name__}: {err})") from None
    scored = attrs.get("cross_encoder") is not None
    return MinedStore(path, attrs, {s: _open_split(path, group, s, k, store, scored) for s in names})


def _open_split(path: Path, group: Any, split: str, k: int, store: FeatureStore, scored: bool) -> MinedSplit:
    sp = store.split(split)
    text_image = np.asarray(sp.text_image, np.int64)
    expected = shapes(k, sp.n_images, sp.n_captions, scored)
    maps: dict[tuple[str, str], np.ndarray] = {}
    for (direction, name), shape in expected.items():
        where = f"{path}: {split}/{direction}/{name}"
        try:
            arr = group[f"{split}/{direction}/{name}"]
        except KeyError:
            raise InputError(f"{where}: array missing") from None
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(ARRAY_DTYPES[name]):
            raise InputError(f"{where} is {arr.dtype} {list(arr.shape)}, expected {ARRAY_DTYPES[name]} {list(shape)}")
        checksums.check_listed(where, arr)
        # one array in memory (M x K x 4 bytes: 20 MB for Flickr30K's captions), every value checked below
        maps[direction, name] = np.asarray(map_rows(where, arr))
    _check_rows(path, split, maps[TEXT_TO_IMAGE, "rows"], sp.n_images, own=text_image, what="image")
    _check_rows(path, split, maps[IMAGE_TO_TEXT, "rows"], sp.n_captions, own=None, what="caption")
    i2t = maps[IMAGE_TO_TEXT, "rows"].astype(np.int64)
    if len(i2t) and (text_image[i2t] == np.arange(len(i2t))[:, None]).any():
        raise InputError(f"{path}: {split}/image_to_text/rows names an image's own caption; rerun `kdpipe mine`")
    for (direction, name), values in maps.items():
        if name != "rows" and len(values) and not np.isfinite(values).all():
            raise InputError(f"{path}: {split}/{direction}/{name} holds NaN or inf; rerun `kdpipe mine`")
    return MinedSplit(
        split,
        *(
            MinedDirection(maps[d, "rows"], maps[d, "sims"], maps.get((d, "ce_scores")))
            for d in (TEXT_TO_IMAGE, IMAGE_TO_TEXT)
        ),
    )


def _check_rows(path: Path, split: str, rows: np.ndarray, n: int, *, own: np.ndarray | None, what: str) -> None:
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise InputError(f"{path}: {split} holds a {what} row outside 0..{n - 1}; rerun `kdpipe mine`")
    if own is not None and len(rows) and (rows == own[:, None]).any():
        raise InputError(f"{path}: {split}/text_to_image/rows names a caption's own image; rerun `kdpipe mine`")


def is_mined_dir(path: Path | str) -> bool:
    attrs = read_attrs(path)
    return attrs is not None and attrs.get("format") == FORMAT


# What `kdpipe mine` may replace or write into (pipeline/store/ownership.py): a mined store, or what a mine
# killed while setting one up left (its .mine/ work directory)
MINED_STORE = Output("a mined store", directory=True, recognise=lambda p: is_mined_dir(p) or (p / WORK_DIR).is_dir())


__all__ = [
    "FORMAT",
    "VERSION",
    "DIRECTIONS",
    "TEXT_TO_IMAGE",
    "IMAGE_TO_TEXT",
    "MinedWriter",
    "MINED_STORE",
    "MinedStore",
    "MinedSplit",
    "MinedDirection",
    "open_mined",
    "store_source",
    "is_mined_dir",
    "shapes",
]
