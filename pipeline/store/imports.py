"""What every import of embeddings computed elsewhere shares (import-hdf5, import-dsmd, import-embeddings):
the checks against the dataset index, the new store's attrs, and the one function that writes and validates it.

An importer turns its source into one `SourceSplit` per split (rows still in their files), checked, then calls
`write_imported`: one feature dimension across splits, the store dtype (the source's when all its embeddings
share a store dtype, else float16), rows copied bit for bit only from a source that says its rows are unit
length in the store's dtype (else L2-normalized in float32), complete=true last, then the store opened and
validated as any reader would. Every row is checked before anything is written (`check_rows`: finite, not
zero, and of unit length where the source says it is normalized, naming the source, array and row), and the
store is built beside `out` and swapped in whole (durable.atomic_dir): a failed import leaves an earlier store
as it was, and anything at `out` that is no feature store is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.store.features import FEATURE_STORE, UNPAIRED_TEXT, open_store, unit_norm_tolerance
from pipeline.store.features_writer import STORE_DTYPES, StoreWriter, jsonable


@dataclass(frozen=True)
class SourceSplit:
    """One split of an imported source, checked: the embeddings stay row sources (an h5py dataset, a memory map,
    a gather over files: anything with .shape, .dtype and [a:b]) read chunk by chunk."""

    image_emb: Any
    text_emb: Any
    text_image: np.ndarray  # int32 [M]
    image_id: list[str]
    unpaired: Any  # [U, D], empty when the file has none

    def embeddings(self) -> tuple[tuple[str, Any], ...]:
        """(store array name, row source) of every embedding array."""
        return (("image_emb", self.image_emb), ("text_emb", self.text_emb), (UNPAIRED_TEXT, self.unpaired))


_CHECK_ROWS = 8192  # rows checked at a time (their norms in float64: 8192 x 768 x 8 bytes = 50 MB)


def check_rows(where: str, array: str, rows: Any, normalized: bool) -> None:
    """Every row of `rows` ([R, D]: anything with .shape, .dtype and [a:b]) finite and not zero (a zero row has no
    direction), and of unit length within the rounding of its dtype where the source says it is normalized;
    else one line naming `where` (the source), `array` and the row."""
    tolerance = unit_norm_tolerance(rows.dtype)
    for a in range(0, rows.shape[0], _CHECK_ROWS):
        block = np.asarray(rows[a : a + _CHECK_ROWS], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = ~finite | (norms == 0) | (normalized & (np.abs(norms - 1) > tolerance))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            what = (
                "is not finite (NaN or inf); fix or drop that row"
                if not finite[r]
                else "is all zeros (it has no direction to normalize); fix or drop that row"
                if norms[r] == 0
                else f"has L2 norm {norms[r]:.6g}, but the source says its rows are normalized; fix that row, or "
                "its `normalized` attribute"
            )
            raise InputError(f"{where}: {array} row {a + r} {what}")


def store_dtype(splits: Any, dtype: str | None) -> str:
    """The asked dtype, or the file's when all its embeddings share a store dtype, else float16."""
    if dtype is None:
        found = {str(np.dtype(s.image_emb.dtype)) for s in splits} | {str(np.dtype(s.text_emb.dtype)) for s in splits}
        dtype = found.pop() if len(found) == 1 and found <= set(STORE_DTYPES) else "float16"
    if dtype not in STORE_DTYPES:
        raise InputError(f"store dtype {dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    return dtype


def import_attrs(
    where: Path,
    attrs: dict[str, Any],
    index: DatasetIndex | None,
    teacher: dict[str, Any] | None,
    source: dict[str, Any],
) -> dict[str, Any]:
    """The new store's attrs: teacher and dataset identity (checked against the index when given); `attrs` are
    the kdpipe attrs the source recorded ({} for files other tools wrote), `source` says what it was."""
    recorded = (attrs.get("dataset") or {}).get("fingerprint")
    if index is not None:
        if recorded is not None and recorded != index.fingerprint:
            raise InputError(
                f"{where}: computed from dataset index {str(recorded)[:12]}, not from the given "
                f"index {index.fingerprint[:12]}"
            )
        dataset = {"name": index.name, "fingerprint": index.fingerprint}
    else:
        dataset = attrs.get("dataset") or {}
    teacher = teacher if teacher is not None else attrs.get("teacher")
    if not teacher:
        raise InputError(f"{where}: no teacher identity recorded in the file; give one (e.g. a name)")
    extra = {k: v for k, v in attrs.items() if k in ("extract", "skipped_images")}
    extra.setdefault("skipped_images", [])
    extra["imported_from"] = source
    return {"teacher": teacher, "dataset": dataset, **extra}


def check_against_index(
    where: Path | str, split: str, index: DatasetIndex, ids: list[str], text_image: np.ndarray
) -> None:
    if split not in index.splits:
        raise InputError(f"{where}: split {split!r} is not in dataset {index.name} (it has {', '.join(index.splits)})")
    view = index.split(split)
    if ids != view.image_id.tolist():
        if len(ids) != view.n_images:
            raise InputError(f"{where}: split {split!r} has {len(ids)} images, the index {view.n_images}")
        bad = next(i for i, (a, b) in enumerate(zip(ids, view.image_id.tolist())) if a != b)
        raise InputError(
            f"{where}: split {split!r} image {bad} is {ids[bad]!r}, the index has "
            f"{view.image_id[bad]!r} (rows must follow the index order)"
        )
    if len(text_image) != view.n_captions or not np.array_equal(text_image, view.text_image):
        raise InputError(f"{where}: split {split!r}: captions do not map onto images as in the index")


def write_imported(
    out_path: Path | str,
    splits: dict[str, SourceSplit],
    *,
    attrs: dict[str, Any],
    dtype: str | None,
    chunk_rows: int,
    normalized: bool,
    where: str,
    expect_fingerprint: str | None = None,
) -> Path:
    """Write checked splits as a complete store (see the module doc) and validate it; returns its path."""
    dims = {s.image_emb.shape[1] for s in splits.values()}
    if len(dims) != 1:
        raise InputError(f"{where}: splits have different feature dimensions {sorted(dims)}")
    for name, sp in splits.items():
        for key, rows in sp.embeddings():
            check_rows(where, f"{name}/{key}", rows, normalized)
    dtype = store_dtype(splits.values(), dtype)
    # bits are copied as they are only from a source that says its rows are unit length, in the store's dtype
    copy_bits = normalized and all(
        np.dtype(s.image_emb.dtype) == np.dtype(dtype) and np.dtype(s.text_emb.dtype) == np.dtype(dtype)
        for s in splits.values()
    )
    with atomic_dir(out_path, FEATURE_STORE) as tmp:
        writer = StoreWriter.create(
            tmp,
            layout={n: (s.image_emb.shape[0], s.text_emb.shape[0], len(s.unpaired)) for n, s in splits.items()},
            dim=int(dims.pop()),
            dtype=dtype,
            chunk_rows=chunk_rows,
            attrs=jsonable(attrs),
        )
        for name, sp in splits.items():
            for key, ds in sp.embeddings():
                bits = copy_bits and np.dtype(ds.dtype) == np.dtype(dtype)
                for i in range(writer.n_chunks(name, key) if len(ds) else 0):
                    a, b = writer.chunk_range(name, key, i)
                    writer.write_chunk(name, key, i, ds[a:b], normalize=not bits)
            writer.write_text_image(name, sp.text_image)
            writer.write_image_id(name, sp.image_id)
        writer.set_attrs(complete=True)
    open_store(out_path, expect_fingerprint=expect_fingerprint)  # validate what was written
    return Path(out_path)


__all__ = ["SourceSplit", "store_dtype", "import_attrs", "check_against_index", "check_rows", "write_imported"]
