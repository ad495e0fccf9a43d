"""Per-chunk checksums of the feature store, kept in each array's own Zarr attributes.

Every array of a store (`<split>/image_emb`, `text_emb`, `text_image`, `image_id`, `unpaired_text_emb`)
carries in its `zarr.json` the attribute

    "chunk_checksums": {"algorithm": "sha256", "chunks": {"c/0/0": "<64 hex digits>", "c/1/0": ...}}

one entry per chunk file, keyed by the chunk key relative to the array directory (the array's own key
encoding), the SHA-256 of the file's bytes as written. It lives in the store's metadata, not inside the
chunk: a checksum a chunk carries with itself (zarr's crc32c codec) travels with the chunk when a file is
copied over from another store of the same shape, and would still match. An array's checksums move with
the array (a compacted split swapped in by a rename keeps its own). The group attrs and the chunk bytes are
unchanged, so the format stays version 1 and plain zarr reads it as before.

Why SHA-256: on the 2-core dev box (bench/store_checksums_bench.py; load 0.5) SHA-256 hashes 1.4 GB/s
(SHA-NI), blake2b 0.8, md5 0.6, sha1 1.7, zlib.crc32 4.5. A 16,384 x 768 fp16 chunk (25 MB) costs ~18 ms, in
extract's commit thread, next to the ~20 s an H100 spends computing it with the giant teacher (~0.1%). crc32
would be 4x faster but 32 bits, and SHA-256 is what `sha256sum` and `hashlib` check with no extra tool (the
store already names its teacher checkpoint by SHA-256); `kdpipe verify` is SHA-256 bound, ~1 GB/s a core.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.store.durable import fsync_dir, fsync_file

ATTR = "chunk_checksums"
ALGORITHM = "sha256"


def digest_bytes(data: Any) -> str:
    """SHA-256 of anything with the buffer protocol (bytes, a C-contiguous numpy array or memory map)."""
    return hashlib.sha256(data).hexdigest()


def chunk_keys(arr: Any) -> list[str]:
    """The key of every chunk of a zarr array that is chunked along its first axis only, in row order."""
    n_chunks = -(-int(arr.shape[0]) // int(arr.chunks[0])) if arr.shape[0] else 0
    rest = (0,) * (arr.ndim - 1)
    return [arr.metadata.encode_chunk_key((i, *rest)) for i in range(n_chunks)]


def key_order(key: str) -> tuple[int, ...]:
    """Sort key of a chunk key ("c/10/0" after "c/9/0"): the chunk coordinates as integers."""
    return tuple(int(p) for p in key.replace(".", "/").split("/") if p.isdigit())


def recorded(where: str, arr: Any) -> dict[str, str] | None:
    """The checksums an array records ({chunk key: hex digest}), or None for a store written before kdpipe
    recorded them. A malformed entry or another algorithm is a one-line InputError."""
    entry = arr.attrs.get(ATTR)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("chunks"), dict):
        raise InputError(f"{where}: attribute {ATTR} is malformed (expected {{algorithm, chunks}})")
    if entry.get("algorithm") != ALGORITHM:
        raise InputError(f"{where}: checksums use {entry.get('algorithm')!r}; this kdpipe checks {ALGORITHM!r}")
    return {str(k): str(v) for k, v in entry["chunks"].items()}


def check_listed(where: str, arr: Any) -> None:
    """The cheap part of the check on open: an array that records checksums records one per chunk, no more."""
    sums = recorded(where, arr)
    if sums is None:
        return
    keys = chunk_keys(arr)
    missing = [k for k in keys if k not in sums]
    if missing:
        raise InputError(f"{where}: chunk {missing[0]} has no recorded checksum (the metadata was edited or lost)")
    extra = sorted(set(sums) - set(keys), key=key_order)
    if extra:
        raise InputError(f"{where}: a checksum is recorded for chunk {extra[0]}, which the array does not have")


def record(array_dir: Path, digests: dict[str, str]) -> None:
    """Merge {chunk key: digest} into the checksums of the array at `array_dir` (one writer at a time: the
    array's zarr.json is rewritten whole). Keys are kept in chunk order, so the metadata does not depend
    on the order the chunks were committed in (a resumed or multi-rank run writes the same bytes)."""
    import zarr

    arr = zarr.open_array(str(array_dir), mode="r+")  # afresh: never from a cached copy of the metadata
    chunks = {**(recorded(str(array_dir), arr) or {}), **digests}
    ordered = {k: chunks[k] for k in sorted(chunks, key=key_order)}
    arr.attrs.update({ATTR: {"algorithm": ALGORITHM, "chunks": ordered}})
    fsync_file(Path(array_dir) / "zarr.json")
    fsync_dir(array_dir)


def nonfinite_row(rows: np.ndarray) -> int | None:
    """First row of a float16/float32 [R, D] block holding NaN or inf, else None. Tests the exponent bits
    (all ones means inf or NaN): 4x faster than np.isfinite on float16, which converts first."""
    if rows.size == 0:
        return None
    bits, mask = (np.uint16, 0x7C00) if rows.dtype.itemsize == 2 else (np.uint32, 0x7F800000)
    exponent = rows.view(bits) & mask
    if int(exponent.max()) != mask:  # the common case, in one pass with no boolean temporary
        return None
    return int(np.flatnonzero((exponent == mask).reshape(len(rows), -1).any(axis=1))[0])


# How far a stored row's L2 norm may be from 1 (rows are normalized in float32, then cast): float16 rounds
# each component to 2^-11 relative, so a unit row's norm moves by at most ~5e-4 (1e-4 measured at D = 256
# and 1024); float32 rows stay within ~1e-6 (normalized elsewhere in float64 and cast, the same). A row
# scaled by another tool, or written unnormalized, is off by far more.
UNIT_NORM_TOLERANCE = {2: 2e-3, 4: 1e-4}  # by itemsize: float16, float32


def off_unit_row(rows: np.ndarray) -> tuple[int, float] | None:
    """(first row, its L2 norm) of a float16/float32 [R, D] block whose norm is not 1 within the dtype's
    UNIT_NORM_TOLERANCE (a NaN row and a zero row included), else None. Norms in float32."""
    tolerance = UNIT_NORM_TOLERANCE[rows.dtype.itemsize]
    for start in range(0, len(rows), 256):  # float32 copies of 256 rows at a time: cache-sized, not a chunk's
        block = np.asarray(rows[start : start + 256], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        off = np.flatnonzero(~(np.abs(norms - 1) <= tolerance))
        if off.size:
            return start + int(off[0]), float(norms[off[0]])
    return None


__all__ = [
    "ATTR",
    "ALGORITHM",
    "UNIT_NORM_TOLERANCE",
    "chunk_keys",
    "recorded",
    "check_listed",
    "record",
    "nonfinite_row",
    "off_unit_row",
]
