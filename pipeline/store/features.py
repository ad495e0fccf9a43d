"""The teacher feature store, format version 1, and its reader: a Zarr v3 group of L2-normalized rows.

Layout (fixed by docs/store-format.md, "Feature store, format version 1"):

    features.zarr/
      zarr.json            group attrs: format="kdpipe-features", version=1, complete, dim, normalized=true,
                           dtype, splits=[...], teacher={...}, dataset={name, fingerprint}, skipped_images=[...]
                           (+ whatever the writer adds, e.g. extract={...} for the settings that shaped the rows)
      <split>/image_emb    float16|float32 [N, D]  chunks [rows, D], rows <= chunk_rows (see chunk_len)
      <split>/text_emb     float16|float32 [M, D]  chunks [rows, D]
      <split>/text_image   int32 [M]               row in <split>/image_emb of each caption's image
      <split>/image_id     string [N]              zarr "string" data type (vlen-utf8 codec), same order as image_emb
      <split>/unpaired_text_emb  float16|float32 [U, D]  OPTIONAL: texts with no image (absent when U = 0)
      teachers/<name>/     OPTIONAL: extract.extra_teachers' stores, one per name listed in the attr `teachers`

Every teacher's logit scale tau (exp of its learned log scale: softmax(tau s_v . s_t) is its own distribution)
is in its attrs as `teacher.logit_scale`, a float, or null for a teacher that has none.

Several teachers (MCAD, DataCompDR's ensembles) stay within version 1 too: each extra teacher's store is a
complete version-1 store of its own at `teachers/<name>/` (its attrs: its teacher with its logit scale, dim,
dtype, ...; arrays: <split>/image_emb, text_emb, unpaired_text_emb in the main store's row order, and copies of
text_image and image_id), so `open_store("features.zarr/teachers/<name>")` or plain zarr reads it as it reads
any store, and the main teacher stays where every version-1 reader looks. The main store lists the names in
its attr `teachers` (absent when there are none: such a store is byte for byte the store written before) and
is marked complete only after every one of them is; `FeatureStore.teacher_store(name)` opens one and checks
that it holds the main store's rows (dataset, splits, image ids, caption order).

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

Each array records `dimension_names` (image_emb [image, feature], text_emb [caption, feature], text_image
[caption], image_id [image], unpaired_text_emb [unpaired_text, feature]), so xarray opens a split as a Dataset:
`xarray.open_zarr("features.zarr", group="test", consolidated=False)`.

Each array's own attrs hold `chunk_checksums` = {algorithm: "sha256", chunks: {chunk key: hex digest}}, one per
chunk file, computed from the file as written (pipeline/store/checksums.py; full check: pipeline/store/verify.py).

The reader (`open_store`) validates the attrs and returns read-only memory maps over the chunk files
(`chunk_files.map_rows`: an `np.memmap` for a one-chunk array, a `ChunkedRows` gathering from the chunk
maps when there are several). On open it checks what is cheap: every chunk file present with its exact size,
and one recorded checksum per chunk (a store written before checksums existed has none and still opens).

Writing (`StoreWriter`, `write_store`, `chunk_len`, `clear_store_dir`): pipeline/store/features_writer.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, reading_file
from pipeline.locks import read_lock
from pipeline.store import checksums
from pipeline.store.chunk_files import ChunkedRows, chunk_file, map_rows
from pipeline.store.ownership import Output

FORMAT = "kdpipe-features"
VERSION = 1
EMB_ARRAYS = ("image_emb", "text_emb")
UNPAIRED_TEXT = "unpaired_text_emb"  # the optional embedding array of texts without an image
STORE_DTYPES = ("float16", "float32")  # of the embedding arrays
# each array's `dimension_names` (zarr v3 metadata): what xarray needs to open a split as a Dataset, where one
# name is one length (image_emb and image_id share "image"; text_emb and text_image share "caption")
DIMENSION_NAMES = {
    "image_emb": ["image", "feature"],
    "text_emb": ["caption", "feature"],
    UNPAIRED_TEXT: ["unpaired_text", "feature"],
    "text_image": ["caption"],
    "image_id": ["image"],
}
TEACHERS = "teachers"  # the group holding the extra teachers' stores, teachers/<name>/ (attrs `teachers`)


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
        self.extra_teachers: tuple[str, ...] = tuple(attrs.get(TEACHERS) or ())
        self._extra: dict[str, FeatureStore] = {}

    @property
    def logit_scale(self) -> float | None:
        """The teacher's logit scale tau (exp of its learned log scale), as extract recorded it; None: none."""
        value = self.teacher.get("logit_scale")
        return None if value is None else float(value)

    def teacher_store(self, name: str, *, wait: bool | None = None) -> FeatureStore:
        """Extra teacher `name`'s store (teachers/<name>/, a format-v1 store of its own), opened and checked to
        hold the rows of this one: the same dataset, splits, image ids, caption order and unpaired texts."""
        if name not in self.extra_teachers:
            have = ", ".join(self.extra_teachers) or "none"
            raise InputError(
                f"{self.path}: no teacher {name!r} in this feature store (it has {have}); "
                "add it to extract.extra_teachers and rerun `kdpipe extract`"
            )
        if name not in self._extra:
            with read_lock(self.path, wait=wait):  # the main store's lock: extract holds it while writing any
                other = _open_store(self.path / TEACHERS / name, self.dataset.get("fingerprint"), None)
            _check_same_rows(self, other)
            self._extra[name] = other
        return self._extra[name]

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


def _check_same_rows(main: FeatureStore, other: FeatureStore) -> None:
    where = f"{other.path}: extra teacher store"
    if other.splits != main.splits:
        raise InputError(f"{where} has splits {list(other.splits)}, the main store {list(main.splits)}; rerun extract")
    for name in main.splits:
        a, b = main.split(name), other.split(name)
        same = (
            a.n_images == b.n_images
            and a.n_unpaired_texts == b.n_unpaired_texts
            and np.array_equal(a.text_image, b.text_image)
            and np.array_equal(a.image_id, b.image_id)
        )
        if not same:
            raise InputError(f"{where}: its split {name!r} does not hold the main store's rows; rerun `kdpipe extract`")


def read_attrs(path: Path | str) -> dict[str, Any] | None:
    """The group attrs of a store directory, or None when there is no readable group metadata there."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested thousands of levels deep
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
    if attrs.get("normalized") is not True:
        raise InputError(
            f"{path}: attribute normalized={attrs.get('normalized')!r}; a format v1 store holds L2-normalized rows "
            "(normalized=true)"
        )
    dtype = attrs.get("dtype")  # checked against every embedding array (_map_emb); absent: nothing to compare
    if dtype is not None and dtype not in STORE_DTYPES:
        raise InputError(f"{path}: attribute dtype={dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
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
        names = sorted(k for k in group.group_keys() if not k.startswith(".") and k != TEACHERS)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: attribute splits={names!r} is not a list of names")
    teachers = attrs.get(TEACHERS, [])
    if not isinstance(teachers, list) or not all(isinstance(n, str) and n for n in teachers):
        raise InputError(f"{path}: attribute {TEACHERS}={teachers!r} is not a list of names")
    splits = {name: _open_split(path, group, name, dim, dtype) for name in names}
    return FeatureStore(path, attrs, splits)


def open_array(path: Path, group: Any, split: str, key: str, *, required: bool = True) -> Any:
    """Array `<split>/<key>` of an opened store group; None when it is absent and not `required`. An array whose
    zarr.json zarr cannot read (not JSON, a field missing or of the wrong type) is one InputError naming it."""
    where = f"{path}: {split}/{key}"
    meta = path / split / key / "zarr.json"
    with reading_file(where, "a Zarr array (its zarr.json)", "the store's metadata is damaged; rerun `kdpipe extract`"):
        try:
            return group[f"{split}/{key}"]
        except KeyError:
            if meta.is_file():  # zarr says "not found" for metadata it cannot make sense of
                raise InputError(
                    f"{where}: {meta.name} is not valid Zarr array metadata; rerun `kdpipe extract`"
                ) from None
            if required:
                raise InputError(f"{path}: split {split!r} has no array {key!r}") from None
            return None


def _open_split(path: Path, group: Any, name: str, dim: int, dtype: str | None) -> StoreSplit:
    arrays = {}
    for key in (*EMB_ARRAYS, "text_image", "image_id"):
        arrays[key] = open_array(path, group, name, key)
        checksums.check_listed(f"{path}: {name}/{key}", arrays[key])
    emb = {key: _map_emb(path, name, key, arrays[key], dim, dtype) for key in EMB_ARRAYS}
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
    unpaired_arr = open_array(path, group, name, UNPAIRED_TEXT, required=False)  # absent: no unpaired texts
    unpaired = None
    if unpaired_arr is not None:
        checksums.check_listed(f"{path}: {name}/{UNPAIRED_TEXT}", unpaired_arr)
        unpaired = _map_emb(path, name, UNPAIRED_TEXT, unpaired_arr, dim, dtype)
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


def _map_emb(path: Path, split: str, key: str, arr: Any, dim: int, attr_dtype: str | None) -> np.ndarray | ChunkedRows:
    """Check that `arr` is an uncompressed row-chunked [R, dim] float array of the dtype the store's attrs
    name, memory-map its chunk files, and check that the first row of each chunk has norm 1: a store whose
    rows were rescaled as a whole is refused here; `kdpipe verify` checks every row."""
    where = f"{path}: {split}/{key}"
    dtype = np.dtype(arr.dtype)
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise InputError(f"{where} has dtype {dtype}, expected float16 or float32")
    if attr_dtype is not None and dtype != np.dtype(attr_dtype):
        raise InputError(f"{where} has dtype {dtype}, but the store's attribute dtype says {attr_dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InputError(f"{where} has shape {list(arr.shape)}, expected [rows, {dim}] (the store's dim)")
    rows = map_rows(where, arr)
    sampled = np.arange(0, rows.shape[0], int(arr.chunks[0]))  # one row per chunk file: a page read each
    off = checksums.off_unit_row(rows[sampled])
    if off is not None:
        raise InputError(
            f"{where}: row {int(sampled[off[0]])} has L2 norm {off[1]:.6g}, in a store of normalized rows (changed "
            f"after extract?); `kdpipe verify {path}` checks every row; rerun `kdpipe extract`"
        )
    return rows


def is_feature_store_dir(path: Path | str) -> bool:
    """True for a directory holding (possibly partial) kdpipe feature-store metadata."""
    attrs = read_attrs(path)
    return attrs is not None and attrs.get("format") == FORMAT


# What a store writer may replace or write into (pipeline/store/ownership.py): a feature store, or what an
# extraction killed while setting one up left (its .extract/ work directory)
FEATURE_STORE = Output(
    "a feature store", directory=True, recognise=lambda p: is_feature_store_dir(p) or (p / ".extract").is_dir()
)


def unit_norm_tolerance(dtype: Any) -> float:
    """How far from 1 the L2 norm of a unit row stored as `dtype` may be: rounding D values to a p-bit mantissa
    moves the norm by at most 2^-p (float16 4.9e-4, float32 6e-8, plus the float32 normalization's own ~1e-6);
    with a margin of 4x and 10x."""
    return 2e-3 if np.dtype(dtype).itemsize <= 2 else 1e-5


__all__ = [
    "FEATURE_STORE",
    "FORMAT",
    "VERSION",
    "EMB_ARRAYS",
    "UNPAIRED_TEXT",
    "STORE_DTYPES",
    "FeatureStore",
    "StoreSplit",
    "open_store",
    "read_attrs",
    "is_feature_store_dir",
    "unit_norm_tolerance",
]
