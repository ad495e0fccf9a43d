"""The teacher feature store, format version 1: a Zarr v3 group of L2-normalized rows, memory-mapped on read.

Layout (fixed by docs/architecture, "Feature store, format version 1"):

    features.zarr/
      zarr.json            group attrs: format="kdpipe-features", version=1, complete, dim, normalized=true,
                           dtype, splits=[...], teacher={...}, dataset={name, fingerprint}, skipped_images=[...]
                           (+ whatever the writer adds, e.g. extract={...} for the settings that shaped the rows)
      <split>/image_emb    float16|float32 [N, D]  chunks [rows, D], rows <= chunk_rows (see chunk_len)
      <split>/text_emb     float16|float32 [M, D]  chunks [rows, D]
      <split>/text_image   int32 [M]               row in <split>/image_emb of each caption's image
      <split>/image_id     string [N]              zarr "string" data type (vlen-utf8 codec), same order as image_emb
      <split>/unpaired_text_emb  float16|float32 [U, D]  OPTIONAL: texts with no image (absent when U = 0)

Unpaired items (distillation on data without captions) stay within version 1, because nothing a version-1
reader already reads changes meaning:
- an unpaired image is an ordinary row of image_emb / image_id that no text_image entry names;
- unpaired texts get an array of their own, `unpaired_text_emb`, laid out like text_emb. A reader that does
  not know it never opens it, so it can neither misread those rows as captions nor miss a caption; a -1 in
  text_image would instead break every existing reader's bounds check (and need a version bump).
A store without unpaired texts is byte for byte the store this code wrote before they existed.

Every array has no filters and no compressors: the `bytes` codec (little endian) only. So a chunk file
`<split>/image_emb/c/<i>/0` is exactly `rows * D * itemsize` raw row-major bytes (the last chunk padded
with zeros to the full chunk size, as zarr does), which `np.memmap` maps directly. Chunks are balanced
(`chunk_len`): the padding is a fraction of a percent, and a chunk is a whole number of 64 KiB when possible. The string array uses
zarr's `vlen-utf8` array-to-bytes codec (an encoding, not a compressor), the one string encoding of zarr 3.1
that has a stable specification; fixed-width unicode (`<U..`) would be raw too but zarr 3.1 warns that its
v3 representation is unstable. Reading with nothing but zarr:

    g = zarr.open_group("features.zarr", mode="r"); assert g.attrs["complete"]
    img = g["test/image_emb"][:]; ids = g["test/image_id"][:]

Each array's own attrs hold `chunk_checksums` = {algorithm: "sha256", chunks: {chunk key: hex digest}}, one per
chunk file, computed from the file as written (pipeline/store/checksums.py; full check: pipeline/store/verify.py).

The reader (`open_store`) validates the attrs and returns read-only memory maps over the chunk files
(`chunk_files.map_rows`: an `np.memmap` for a one-chunk array, a `ChunkedRows` gathering from the chunk
maps when there are several). On open it checks what is cheap: every chunk file present with its exact size,
and one recorded checksum per chunk (a store written before checksums existed has none and still opens).

Writing: `write_store` (one shot, for tests and tools) and `StoreWriter` (chunk by chunk from any number
of processes, used by the resumable extract stage), through zarr's own array writes and attribute updates,
fsync'd after zarr wrote (`durable`). Rows are L2-normalized in float32 before being stored.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.locks import read_lock
from pipeline.store import checksums
from pipeline.store.chunk_files import ChunkedRows, chunk_file, map_rows
from pipeline.store.durable import fsync_dir, fsync_file, fsync_tree

FORMAT = "kdpipe-features"
VERSION = 1
EMB_ARRAYS = ("image_emb", "text_emb")
UNPAIRED_TEXT = "unpaired_text_emb"  # the optional embedding array of texts without an image
STORE_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_ROWS = 16384
_SMALL_CHUNK = 1 << 20  # rows per chunk of the 1-D arrays (text_image, image_id): one file for any real dataset


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSplit:
    name: str
    image_emb: np.ndarray | ChunkedRows  # [N, D] read-only, memory-mapped from the chunk files (no copy)
    text_emb: np.ndarray | ChunkedRows  # [M, D] idem
    text_image: np.ndarray  # [M] int32, row in image_emb of each caption's image
    image_id: np.ndarray  # [N] object array of str
    unpaired_text_emb: np.ndarray | None = None  # [U, D] read-only memory map; None: the split has none

    @property
    def n_images(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def n_unpaired_texts(self) -> int:
        return 0 if self.unpaired_text_emb is None else int(self.unpaired_text_emb.shape[0])

    @property
    def unpaired_image(self) -> np.ndarray:
        """int64 [N_u] rows of image_emb that no caption names (images without captions), in row order."""
        paired = np.zeros(self.n_images, dtype=bool)
        paired[self.text_image] = True
        return np.flatnonzero(~paired)

    @property
    def n_captions(self) -> int:
        return int(self.text_emb.shape[0])


class FeatureStore:
    """An opened, validated, complete store. `split(name)` gives the memory-mapped arrays of one split."""

    def __init__(self, path: Path, attrs: dict[str, Any], splits: dict[str, StoreSplit]) -> None:
        self.path = path
        self.attrs = attrs
        self.dim: int = int(attrs["dim"])
        self.teacher: dict[str, Any] = dict(attrs.get("teacher") or {})
        self.dataset: dict[str, Any] = dict(attrs.get("dataset") or {})
        self._splits = splits
        self.splits: tuple[str, ...] = tuple(splits)

    def split(self, name: str) -> StoreSplit:
        if name not in self._splits:
            raise InputError(
                f"{self.path}: no split {name!r} in this feature store; it has {', '.join(self.splits) or 'none'}"
            )
        return self._splits[name]

    @property
    def skipped_images(self) -> list[dict[str, Any]]:
        """Images left out by extract's `on_bad_image: skip` ({split, image_id, index_row, path, reason})."""
        return list(self.attrs.get("skipped_images") or [])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}: {v.n_images} images / {v.n_captions} captions" for s, v in self._splits.items())
        return f"FeatureStore({str(self.path)!r}, dim={self.dim}, {sizes})"


def read_attrs(path: Path | str) -> dict[str, Any] | None:
    """The group attrs of a store directory, or None when there is no readable group metadata there."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        return None
    attrs = doc.get("attributes")
    return attrs if isinstance(attrs, dict) else None


def open_store(
    path: Path | str, *, expect_fingerprint: str | None = None, expect_dim: int | None = None, wait: bool | None = None
) -> FeatureStore:
    """Open and validate a complete format-v1 store; every problem is an InputError of one line.

    Under the store's lock, shared (pipeline/locks.py `read_lock`): while a run rewrites the store this waits
    for it, or with wait=False (or under --no-wait) raises `OutputLocked` naming it. Every chunk file is
    mapped here, so what the returned store reads never changes afterwards (writers replace files by rename,
    never in place)."""
    path = Path(path)
    with read_lock(path, wait=wait):
        return _open_store(path, expect_fingerprint, expect_dim)


def _open_store(path: Path, expect_fingerprint: str | None, expect_dim: int | None) -> FeatureStore:
    if not path.is_dir():
        raise InputError(f"{path}: no feature store here (directory not found); run `kdpipe extract` first")
    attrs = read_attrs(path)
    if attrs is None:
        raise InputError(f"{path}: not a feature store (no readable Zarr v3 group metadata zarr.json)")
    if attrs.get("format") != FORMAT:
        raise InputError(f"{path}: not a kdpipe feature store (format={attrs.get('format')!r}, expected {FORMAT!r})")
    if attrs.get("version") != VERSION:
        raise InputError(f"{path}: feature store version {attrs.get('version')!r}; this kdpipe reads version {VERSION}")
    if attrs.get("complete") is not True:
        raise InputError(
            f"{path}: feature store is incomplete (extraction was interrupted or is still running); "
            "rerun `kdpipe extract` to finish it"
        )
    dim = attrs.get("dim")
    if not isinstance(dim, int) or dim <= 0:
        raise InputError(f"{path}: attribute dim={dim!r} is not a positive integer")
    if expect_dim is not None and dim != expect_dim:
        raise InputError(f"{path}: feature dimension {dim}, expected {expect_dim}")
    if expect_fingerprint is not None:
        found = (attrs.get("dataset") or {}).get("fingerprint")
        if found != expect_fingerprint:
            raise InputError(
                f"{path}: computed from dataset index {str(found)[:12]}, not from the current index "
                f"{expect_fingerprint[:12]}; rerun `kdpipe extract`"
            )

    import zarr  # imported here: opening a store is the only reader step that needs it

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 -- any zarr failure is a broken store for the user
        raise InputError(f"{path}: cannot open the Zarr group ({type(err).__name__}: {err})") from None
    names = attrs.get("splits")
    if names is None:
        names = sorted(k for k in group.group_keys() if not k.startswith("."))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: attribute splits={names!r} is not a list of names")
    splits = {name: _open_split(path, group, name, dim) for name in names}
    return FeatureStore(path, attrs, splits)


def _open_split(path: Path, group: Any, name: str, dim: int) -> StoreSplit:
    arrays = {}
    for key in (*EMB_ARRAYS, "text_image", "image_id"):
        try:
            arrays[key] = group[f"{name}/{key}"]
        except KeyError:
            raise InputError(f"{path}: split {name!r} has no array {key!r}") from None
        checksums.check_listed(f"{path}: {name}/{key}", arrays[key])
    emb = {key: _map_emb(path, name, key, arrays[key], dim) for key in EMB_ARRAYS}
    n, m = emb["image_emb"].shape[0], emb["text_emb"].shape[0]

    ti = arrays["text_image"]
    if ti.ndim != 1 or ti.shape[0] != m or np.dtype(ti.dtype) != np.int32:
        raise InputError(f"{path}: {name}/text_image is {ti.dtype} {list(ti.shape)}, expected int32 [{m}]")
    text_image = np.asarray(_read_small(path, name, "text_image", ti))
    if m and (int(text_image.min()) < 0 or int(text_image.max()) >= n):
        bad = int(np.flatnonzero((text_image < 0) | (text_image >= n))[0])
        raise InputError(
            f"{path}: {name}/text_image[{bad}] = {int(text_image[bad])} points outside the split's {n} images"
        )
    text_image.setflags(write=False)

    ids = arrays["image_id"]
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InputError(f"{path}: {name}/image_id has shape {list(ids.shape)}, expected [{n}]")
    image_id = (
        np.array([str(v) for v in _read_small(path, name, "image_id", ids).tolist()], dtype=object)
        if n
        else np.empty(0, dtype=object)
    )
    image_id.setflags(write=False)
    try:
        unpaired_arr = group[f"{name}/{UNPAIRED_TEXT}"]
    except KeyError:  # optional: a split without texts that have no image
        unpaired = None
    else:
        checksums.check_listed(f"{path}: {name}/{UNPAIRED_TEXT}", unpaired_arr)
        unpaired = _map_emb(path, name, UNPAIRED_TEXT, unpaired_arr, dim)
    return StoreSplit(
        name=name,
        image_emb=emb["image_emb"],
        text_emb=emb["text_emb"],
        text_image=text_image,
        image_id=image_id,
        unpaired_text_emb=unpaired,
    )


def _read_small(path: Path, split: str, key: str, arr: Any) -> np.ndarray:
    """All of a 1-D array (text_image, image_id), its chunk files checked first: present, and for the raw int32
    array of the size its shape gives; a file zarr cannot decode is named instead of ending in a traceback."""
    where = f"{path}: {split}/{key}"
    raw = np.dtype(arr.dtype).kind == "i"
    for i, chunk_key in enumerate(checksums.chunk_keys(arr)):
        f = chunk_file(arr, (i,))
        expected = int(arr.chunks[0]) * np.dtype(arr.dtype).itemsize
        if not f.is_file():
            raise InputError(f"{where}: chunk file {chunk_key} is missing")
        if raw and f.stat().st_size != expected:
            raise InputError(f"{where}: chunk file {chunk_key} has {f.stat().st_size} bytes, expected {expected}")
    try:
        return arr[...]
    except Exception as err:  # noqa: BLE001 -- whatever zarr's decoder raises, the file is damaged
        raise InputError(f"{where}: a chunk file cannot be decoded ({type(err).__name__}: {err})") from None


def _map_emb(path: Path, split: str, key: str, arr: Any, dim: int) -> np.ndarray | ChunkedRows:
    """Check that `arr` is an uncompressed row-chunked [R, dim] float array and memory-map its chunk files."""
    where = f"{path}: {split}/{key}"
    dtype = np.dtype(arr.dtype)
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise InputError(f"{where} has dtype {dtype}, expected float16 or float32")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InputError(f"{where} has shape {list(arr.shape)}, expected [rows, {dim}] (the store's dim)")
    return map_rows(where, arr)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def l2_normalize_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows divided by their L2 norm (a zero row stays zero, as torch.nn.functional.normalize does)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float32))[:, None]
    return rows / np.maximum(norms, np.float32(1e-12))


def is_feature_store_dir(path: Path | str) -> bool:
    """True for a directory holding (possibly partial) kdpipe feature-store metadata."""
    attrs = read_attrs(path)
    return attrs is not None and attrs.get("format") == FORMAT


def clear_store_dir(path: Path, *, keep: Iterable[str] = ()) -> None:
    """Delete everything inside `path` (a feature store or an empty directory), keeping the names in `keep`.

    Refuses a non-empty directory that is not a feature store, so a wrong `--out` never deletes user data."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory; expected a feature store location")
    entries = [e for e in path.iterdir() if e.name not in set(keep)]
    attrs = read_attrs(path) or {}
    if entries and attrs.get("format") != FORMAT and not (path / ".extract").is_dir():
        raise InputError(f"{path}: exists, is not empty and is not a feature store; remove it or choose another path")
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
    "FORMAT",
    "VERSION",
    "UNPAIRED_TEXT",
    "FeatureStore",
    "StoreSplit",
    "StoreWriter",
    "open_store",
    "write_store",
    "read_attrs",
    "l2_normalize_rows",
    "jsonable",
    "chunk_len",
]
