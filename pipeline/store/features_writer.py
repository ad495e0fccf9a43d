"""Writing a feature store (format version 1, pipeline/store/features.py): `write_store` (one shot, for tests
and tools) and `StoreWriter` (chunk by chunk from any number of processes, used by the resumable extract
stage), through zarr's own array writes and attribute updates, fsync'd after zarr wrote (`durable`). Rows are
L2-normalized in float32 before being stored. Also the layout every writer shares (`chunk_len`) and the one
way a store directory is cleared (`clear_store_dir`, which refuses a directory that is not a store).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.store import checksums
from pipeline.store.chunk_files import ChunkedRows, chunk_file, map_rows
from pipeline.store.durable import fsync_dir, fsync_file, fsync_tree
from pipeline.store.features import (
    DIMENSION_NAMES,
    EMB_ARRAYS,
    FEATURE_STORE,
    FORMAT,
    STORE_DTYPES,
    UNPAIRED_TEXT,
    VERSION,
    read_attrs,
)
from pipeline.store.ownership import claim

DEFAULT_CHUNK_ROWS = 16384
_SMALL_CHUNK = 1 << 20  # rows per chunk of the 1-D arrays (text_image, image_id): one file for any real dataset


def l2_normalize_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows divided by their L2 norm (a zero row stays zero, as torch.nn.functional.normalize does)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float32))[:, None]
    return rows / np.maximum(norms, np.float32(1e-12))


def clear_store_dir(path: Path, *, keep: Iterable[str] = ()) -> None:
    """Delete everything inside `path` (a feature store or an empty directory), keeping the names in `keep`.

    Refuses a non-empty directory that is not a feature store, so a wrong `--out` never deletes user data."""
    path = Path(path)
    claim(path, FEATURE_STORE)
    if not path.exists():
        return
    entries = [e for e in path.iterdir() if e.name not in set(keep)]
    attrs = read_attrs(path) or {}
    if attrs.get("complete") is True:
        # first, so that a reader without the lock (plain zarr) is refused, never shown a half-deleted store
        _mark_incomplete(path)
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


def _mark_incomplete(path: Path) -> None:
    import zarr

    zarr.open_group(str(path), mode="r+").attrs["complete"] = False  # zarr rewrites zarr.json by temp + rename
    fsync_file(path / "zarr.json")
    fsync_dir(path)


_ALIGN_BYTES = 65536  # chunk sizes are multiples of this where possible: whole pages for 4/16/64 KiB pages


def chunk_len(n: int, chunk_rows: int, row_bytes: int | None = None) -> int:
    """Rows per chunk of an array of n rows, at most `chunk_rows`: a small array is one exact-size chunk;
    a larger one gets balanced chunks (the padded last chunk is nearly full, so the store stays ~rows x D
    x itemsize bytes) whose byte size is a multiple of 64 KiB when that fits, so the reader can map the
    files back to back. Depends only on its arguments (the same layout on every machine)."""
    if n <= chunk_rows:
        return max(1, n)
    k = -(-n // chunk_rows)
    align = _ALIGN_BYTES // math.gcd(_ALIGN_BYTES, row_bytes) if row_bytes else 1
    while True:
        c = -(-n // k)
        aligned = -(-c // align) * align
        if aligned <= chunk_rows:
            return aligned
        if align > chunk_rows:
            return c  # whole pages are impossible within chunk_rows: balanced, unaligned
        k += 1


def _small_chunk_len(n: int) -> int:
    """Rows per chunk of the 1-D arrays (text_image, image_id): all n in one chunk up to _SMALL_CHUNK."""
    return max(1, min(_SMALL_CHUNK, n))


class StoreWriter:
    """Writes a format-v1 store in three steps, from one or many processes:

    1. `StoreWriter.create(...)` (one process): clears the directory, writes all metadata with
       complete=false, and the small arrays can then be written with `write_text_image` / `write_image_id`;
    2. `write_chunk(split, array, i, rows)` (any process, each chunk exactly once at a time): rows are
       normalized, cast, padded and written as the raw chunk file, durably (temp file, fsync, rename);
    3. `set_attrs(complete=True, ...)` (one process) once every chunk is written.

    Checksums (pipeline/store/checksums.py): `write_chunk` returns the SHA-256 of the chunk file it wrote and
    keeps it until `record_checksums()` (called by `set_attrs(complete=True)`) stores it in the array's attrs;
    a process that does not finalize (an extract rank) hands its digests to the one that does
    (`record_checksums({(split, array): {chunk index: digest}})`). The small arrays record theirs at once.
    A store is never marked complete while a chunk lacks its checksum.
    """

    def __init__(self, path: Path | str) -> None:
        import zarr

        self.path = Path(path)
        attrs = read_attrs(self.path)
        if attrs is None or attrs.get("format") != FORMAT:
            raise InputError(f"{self.path}: no feature-store metadata to write into")
        self.dim = int(attrs["dim"])
        self.dtype = np.dtype(attrs["dtype"]).newbyteorder("<")
        group = zarr.open_group(str(self.path), mode="r+")
        self._arrays: dict[tuple[str, str], Any] = {}  # (split, array) -> zarr array
        self._shapes: dict[tuple[str, str], tuple[int, int]] = {}  # (split, array) -> (rows, chunk_rows)
        self._digests: dict[tuple[str, str], dict[int, str]] = {}  # written by this writer, not yet recorded
        for split in attrs["splits"]:
            for key in (*EMB_ARRAYS, "text_image", "image_id", UNPAIRED_TEXT):
                if key == UNPAIRED_TEXT and f"{split}/{key}" not in group:
                    continue  # optional: only stores with texts without an image have it
                # write_empty_chunks is a runtime setting, not stored: without it zarr would skip (or delete)
                # a chunk equal to the fill value, and the reader needs every chunk file
                arr = group[f"{split}/{key}"].with_config({"write_empty_chunks": True})
                self._arrays[split, key] = arr
                self._shapes[split, key] = (int(arr.shape[0]), int(arr.chunks[0]))

    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        layout: dict[str, tuple[int, int] | tuple[int, int, int]],
        dim: int,
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        attrs: dict[str, Any] | None = None,
    ) -> StoreWriter:
        """A new store at `path` for layout {split: (n_images, n_captions[, n_unpaired_texts])}; anything already
        there is removed. The unpaired_text_emb array is created only for a split with unpaired texts."""
        import zarr

        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype {dtype!r}; expected one of {STORE_DTYPES}")
        if chunk_rows < 1 or dim < 1:
            raise ValueError("chunk_rows and dim must be positive")
        path = Path(path)
        clear_store_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        head = {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            "dim": int(dim),
            "normalized": True,
            "dtype": dtype,
            "splits": list(layout),
        }
        root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={**head, **(attrs or {})})
        for split, (n_images, n_captions, *more) in layout.items():
            g = root.create_group(split)
            n_unpaired = int(more[0]) if more else 0
            emb = (("image_emb", n_images), ("text_emb", n_captions)) + (
                ((UNPAIRED_TEXT, n_unpaired),) if n_unpaired else ()
            )
            for key, n in emb:
                rows = chunk_len(n, chunk_rows, dim * np.dtype(dtype).itemsize)
                g.create_array(
                    key,
                    shape=(n, dim),
                    chunks=(rows, dim),
                    dtype=dtype,
                    filters=None,
                    compressors=None,
                    fill_value=0.0,
                    config={"write_empty_chunks": True},
                    dimension_names=DIMENSION_NAMES[key],
                )
            g.create_array(
                "text_image",
                shape=(n_captions,),
                chunks=(_small_chunk_len(n_captions),),
                dtype="int32",
                filters=None,
                compressors=None,
                fill_value=0,
                config={"write_empty_chunks": True},
                dimension_names=DIMENSION_NAMES["text_image"],
            )
            g.create_array(
                "image_id",
                shape=(n_images,),
                chunks=(_small_chunk_len(n_images),),
                dtype=str,
                filters=None,
                compressors=None,
                fill_value="",
                config={"write_empty_chunks": True},
                dimension_names=DIMENSION_NAMES["image_id"],
            )
        return cls(path)

    # -- layout -------------------------------------------------------------------------------------------
    def rows(self, split: str, array: str) -> int:
        """Rows of an array (0 for an optional array the split lacks)."""
        return self._shapes.get((split, array), (0, 1))[0]

    def chunk_rows(self, split: str, array: str) -> int:
        return self._shapes[split, array][1]

    def n_chunks(self, split: str, array: str) -> int:
        rows, cr = self._shapes[split, array]
        return -(-rows // cr)

    def chunk_range(self, split: str, array: str, i: int) -> tuple[int, int]:
        rows, cr = self._shapes[split, array]
        return i * cr, min(rows, (i + 1) * cr)

    def chunk_path(self, split: str, array: str, i: int) -> Path:
        return chunk_file(self._arrays[split, array], (i, 0))

    # -- data ---------------------------------------------------------------------------------------------
    def chunk_key(self, split: str, array: str, i: int) -> str:
        return self._arrays[split, array].metadata.encode_chunk_key((i, 0))

    def write_chunk(self, split: str, array: str, i: int, rows: np.ndarray, *, normalize: bool = True) -> str:
        """Normalize `rows` (float, [chunk length, D]) in float32, cast, and write chunk i durably (zarr pads
        the last chunk with the fill value 0 and renames its temp file into place; the fsync is ours).
        Returns the SHA-256 of the chunk file as written (read back from the page cache), also kept for
        `record_checksums`.

        normalize=False copies rows that are already normalized and in the store dtype bit for bit."""
        start, stop = self.chunk_range(split, array, i)
        rows = np.asarray(rows)
        if rows.shape != (stop - start, self.dim):
            raise ValueError(f"{split}/{array} chunk {i}: got rows {rows.shape}, expected {(stop - start, self.dim)}")
        if rows.dtype.kind == "f" and not np.isfinite(rows).all():
            bad = start + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise InputError(
                f"{self.path}: {split}/{array} chunk {self.chunk_key(split, array, i)} row {bad}: the teacher "
                "produced non-finite features (NaN or inf); with compute_dtype float16 this is an overflow: "
                "use bfloat16 or float32"
            )
        self._arrays[split, array][start:stop] = (l2_normalize_rows(rows) if normalize else rows).astype(self.dtype)
        f = self.chunk_path(split, array, i)
        digest = sha256_file(f)
        fsync_file(f)
        fsync_dir(f.parent)
        self._digests.setdefault((split, array), {})[i] = digest
        return digest

    def record_checksums(self, digests: dict[tuple[str, str], dict[int, str]] | None = None) -> None:
        """Store chunk checksums in the arrays' attrs: `digests` {(split, array): {chunk index: sha256}} from
        other processes, plus those of the chunks this writer wrote. One process at a time (rank 0)."""
        merged: dict[tuple[str, str], dict[int, str]] = {}
        for source in (digests or {}, self._digests):
            for name, found in source.items():
                merged.setdefault(name, {}).update(found)
        for (split, array), found in merged.items():
            keys = {self.chunk_key(split, array, i): d for i, d in found.items()}
            checksums.record(self.path / split / array, keys)
        self._digests = {}

    def missing_checksums(self) -> list[tuple[str, str, int]]:
        """(split, array, chunk index) of every embedding chunk whose checksum is not recorded yet."""
        import zarr

        out = []
        for split, array in self._arrays:
            if array not in (*EMB_ARRAYS, UNPAIRED_TEXT):
                continue
            arr = zarr.open_array(str(self.path / split / array), mode="r")
            sums = checksums.recorded(f"{self.path}: {split}/{array}", arr) or {}
            keys = checksums.chunk_keys(arr)
            out.extend((split, array, i) for i, k in enumerate(keys) if k not in sums)
        return out

    def read_rows(self, split: str, array: str) -> np.ndarray | ChunkedRows:
        """The rows written so far of an embedding array, memory-mapped (unwritten chunks must not be read)."""
        return map_rows(f"{self.path}: {split}/{array}", self._arrays[split, array])

    def write_text_image(self, split: str, text_image: np.ndarray) -> None:
        self._write_small(split, "text_image", np.asarray(text_image, dtype=np.int32))

    def write_image_id(self, split: str, image_id: Iterable[str]) -> None:
        ids = [str(v) for v in image_id]
        self._write_small(split, "image_id", np.array(ids, dtype=np.dtypes.StringDType()))

    def _write_small(self, split: str, key: str, values: np.ndarray) -> None:
        if values.shape != (self.rows(split, key),):
            raise ValueError(f"{split}/{key}: got {values.shape}, expected ({self.rows(split, key)},)")
        if len(values):
            self._arrays[split, key][...] = values
        fsync_tree(self.path / split / key)
        # one writer writes the small arrays (create, compaction, tools): their checksums go in at once
        arr = self._arrays[split, key]
        checksums.record(self.path / split / key, {k: sha256_file(chunk_file(arr, (i,))) for i, k in _keyed(arr)})

    def attrs(self) -> dict[str, Any]:
        return read_attrs(self.path) or {}

    def set_attrs(self, **updates: Any) -> None:
        """Update group attrs atomically (zarr writes temp + rename; we fsync); `complete=True` goes last, after
        this writer's checksums are recorded, and only when every chunk has one."""
        import zarr

        if updates.get("complete") is True:
            self.record_checksums()
            missing = self.missing_checksums()
            if missing:  # a writer bug, not a user error: a complete store always has every checksum
                raise RuntimeError(f"{self.path}: chunk {missing[0]} has no recorded checksum; not marking complete")
        # opened afresh: zarr rewrites the whole metadata from its cached copy, which another process
        # (an extract rank) may have updated since this writer was made
        zarr.open_group(str(self.path), mode="r+").attrs.update(jsonable(updates))
        fsync_file(self.path / "zarr.json")
        fsync_dir(self.path)


def _keyed(arr: Any) -> list[tuple[int, str]]:
    return list(enumerate(checksums.chunk_keys(arr)))


def jsonable(value: Any) -> Any:
    """Plain JSON values (tuples -> lists, numpy scalars -> Python, Paths -> str)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def write_store(
    path: Path | str,
    splits: dict[str, dict[str, np.ndarray]],
    *,
    teacher: dict,
    dataset: dict,
    dtype: str = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    extra_attrs: dict[str, Any] | None = None,
) -> None:
    """Write a complete store in one go. splits[name] = {image_emb [N,D], text_emb [M,D], text_image [M],
    image_id [N], optionally unpaired_text_emb [U,D]}; rows are L2-normalized (float32 math) and stored as
    `dtype`; complete=true is set last."""
    if not splits:
        raise ValueError("write_store: no splits given")
    dims = set()
    layout = {}
    for name, s in splits.items():
        missing = [k for k in (*EMB_ARRAYS, "text_image", "image_id") if k not in s]
        if missing:
            raise ValueError(f"write_store: split {name!r} lacks {missing}")
        img, txt = np.asarray(s["image_emb"]), np.asarray(s["text_emb"])
        ti = np.asarray(s["text_image"])
        if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
            raise ValueError(
                f"write_store: split {name!r}: image_emb {img.shape} and text_emb {txt.shape} "
                "must be [rows, D] with one D"
            )
        if ti.shape != (txt.shape[0],) or len(s["image_id"]) != img.shape[0]:
            raise ValueError(
                f"write_store: split {name!r}: text_image needs one entry per caption and image_id one per image"
            )
        if len(ti) and (ti.min() < 0 or ti.max() >= img.shape[0]):
            raise ValueError(f"write_store: split {name!r}: text_image points outside the {img.shape[0]} images")
        dims.add(img.shape[1])
        n_unpaired = len(s.get(UNPAIRED_TEXT, ()))
        if n_unpaired and np.asarray(s[UNPAIRED_TEXT]).shape[1:] != (img.shape[1],):
            raise ValueError(f"write_store: split {name!r}: {UNPAIRED_TEXT} must be [rows, {img.shape[1]}]")
        layout[name] = (img.shape[0], txt.shape[0], n_unpaired)
    if len(dims) != 1:
        raise ValueError(f"write_store: splits have different dims {sorted(dims)}")
    dim = dims.pop()
    attrs = {"teacher": teacher, "dataset": dataset, "skipped_images": [], **(extra_attrs or {})}
    writer = StoreWriter.create(path, layout=layout, dim=dim, dtype=dtype, chunk_rows=chunk_rows, attrs=jsonable(attrs))
    for name, s in splits.items():
        for key in (*EMB_ARRAYS, UNPAIRED_TEXT):
            if writer.rows(name, key) == 0:
                continue
            data = np.asarray(s[key])
            for i in range(writer.n_chunks(name, key)):
                a, b = writer.chunk_range(name, key, i)
                writer.write_chunk(name, key, i, data[a:b])
        writer.write_text_image(name, s["text_image"])
        writer.write_image_id(name, s["image_id"])
    fsync_tree(writer.path)
    writer.set_attrs(complete=True)


__all__ = [
    "STORE_DTYPES",
    "DEFAULT_CHUNK_ROWS",
    "StoreWriter",
    "write_store",
    "l2_normalize_rows",
    "jsonable",
    "chunk_len",
    "clear_store_dir",
]
