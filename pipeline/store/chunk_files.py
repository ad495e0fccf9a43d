"""What zarr cannot do for our stores, in one place: memory-map raw chunk files, and lay out a shard by hand.

Everything else (creating arrays, writing rows, attributes) goes through zarr's public API. Two things do not:

- **Memory maps.** zarr v3 reads a chunk into a fresh buffer; it has no mmap. Our arrays are uncompressed
  (`bytes` codec, little endian, nothing else), so a chunk file is exactly `chunk_rows x D x itemsize`
  row-major bytes that `np.memmap` maps without a copy. `map_rows` checks the codecs and the file sizes,
  then returns one `np.memmap` for a one-chunk array, or a `ChunkedRows` over the chunk maps otherwise
  (several files cannot be one numpy array without mapping them at fixed addresses, which the standard
  library cannot do; a 256-row random gather through `ChunkedRows` measures well under the 1 ms target,
  bench/feature_store_bench.py prints it).
- **Shards written in parts.** The image cache is one shard file per split that many processes fill at
  row offsets; zarr writes a shard only whole. `shard_index` gives the index zarr's `sharding_indexed`
  codec expects for inner chunks stored back to back from offset 0, and `check_shard_index` verifies it
  before the reader maps the file.

Chunk file names always come from the array's own chunk-key encoding (`chunk_file`), never a hard-coded key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

SHARD_INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64 per inner chunk


def chunk_file(arr: Any, coords: tuple[int, ...]) -> Path:
    """The file of chunk `coords` of a zarr array in a local store, named by the array's chunk-key encoding."""
    root = getattr(arr.store, "root", None)
    if root is None:
        raise ValueError(f"{arr}: not in a local directory store; its chunks are not files")
    return Path(root, arr.path, arr.metadata.encode_chunk_key(coords))


def check_raw_codecs(where: str, arr: Any) -> None:
    """One-line InputError unless every chunk of `arr` is raw little-endian bytes (no compressor, no sharding)."""
    from zarr.codecs import BytesCodec

    codecs = getattr(arr.metadata, "codecs", None)
    ok = (
        codecs is not None
        and len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == "little")
    )
    if not ok:
        raise InputError(
            f"{where}: codecs {[type(c).__name__ for c in codecs or ()]}; format v1 stores raw "
            "uncompressed chunks (bytes codec, little endian, no compressor or sharding)"
        )


def map_rows(where: str, arr: Any) -> np.ndarray | ChunkedRows:
    """Read-only rows of a raw [R, D] zarr array chunked along rows only, mapped from its chunk files."""
    check_raw_codecs(where, arr)
    rows, dim = (int(s) for s in arr.shape)
    chunk_rows = int(arr.chunks[0])
    if int(arr.chunks[1]) != dim:
        raise InputError(f"{where}: chunks {list(arr.chunks)} split the feature axis; format v1 chunks rows only")
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    if rows == 0:
        out = np.empty((0, dim), dtype=dtype)
        out.setflags(write=False)
        return out
    chunk_bytes = chunk_rows * dim * dtype.itemsize
    parts = []
    for i in range(-(-rows // chunk_rows)):
        f = chunk_file(arr, (i, 0))
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise InputError(f"{where}: chunk file {arr.metadata.encode_chunk_key((i, 0))} is missing") from None
        if size != chunk_bytes:
            raise InputError(
                f"{where}: chunk file {arr.metadata.encode_chunk_key((i, 0))} has {size} bytes, expected "
                f"{chunk_bytes} (truncated or not an uncompressed chunk)"
            )
        parts.append(np.memmap(f, dtype=dtype, mode="r", shape=(chunk_rows, dim)))
    if len(parts) == 1:
        return np.memmap(parts[0].filename, dtype=dtype, mode="r", shape=(rows, dim))
    return ChunkedRows(parts, rows)


class ChunkedRows:
    """A read-only [rows, D] array over the memory maps of consecutive row chunks (the last one padded).

    Indexing with an int, a slice, an integer or boolean array, and `np.take(..., axis=0)` gather the rows
    chunk by chunk into a new array (a slice inside one chunk is a view of its map); `np.asarray` copies
    everything into one array."""

    ndim = 2

    def __init__(self, parts: list[np.memmap], rows: int) -> None:
        self._parts = parts
        self._chunk = int(parts[0].shape[0])
        self.shape = (int(rows), int(parts[0].shape[1]))
        self.dtype = parts[0].dtype

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ChunkedRows(shape={self.shape}, dtype={self.dtype}, chunks={len(self._parts)})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("ChunkedRows: several chunk files are one array only as a copy")
        out = self._range(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def take(self, indices: Any, axis: int = 0, out: np.ndarray | None = None, mode: str = "raise") -> np.ndarray:
        if axis != 0 or mode != "raise":
            raise NotImplementedError("ChunkedRows.take gathers rows only (axis=0, mode='raise')")
        return self._gather(np.asarray(indices), out)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # rows first, then the rest on the gathered rows
            if not key:
                return self[:]
            rows = self[key[0]]
            # an int row index drops the row axis; any other keeps it
            return rows[key[1:]] if isinstance(key[0], (int, np.integer)) else rows[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self._gather(np.array([key]))[0]
        if key is Ellipsis:
            key = slice(None)
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step))
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {key.shape} for {self.shape[0]} rows")
            key = np.flatnonzero(key)
        return self._gather(key)

    def _range(self, start: int, stop: int) -> np.ndarray:
        first, last = start // self._chunk, (stop - 1) // self._chunk
        if stop <= start:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        if first == last:  # inside one chunk: a view of its map, no copy
            return self._parts[first][start - first * self._chunk : stop - first * self._chunk]
        pieces = [self._parts[i] for i in range(first, last + 1)]
        out = np.concatenate(pieces)[start - first * self._chunk : stop - first * self._chunk]
        out.setflags(write=False)
        return out

    def _gather(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows must be integers, got {idx.dtype}")
        n = self.shape[0]
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        if out is None:
            out = np.empty((*idx.shape, self.shape[1]), dtype=self.dtype)
        chunk, offset = np.divmod(idx, self._chunk)
        for c in np.unique(chunk):  # one fancy-indexing copy per chunk that holds some of the rows
            hit = chunk == c
            out[hit] = self._parts[c][offset[hit]]
        return out


def shard_index(n_chunks: int, chunk_bytes: int) -> bytes:
    """The index of a shard whose `n_chunks` inner chunks of `chunk_bytes` lie back to back from offset 0
    (zarr's sharding_indexed layout with a `bytes` index codec, no checksum, index at the end)."""
    index = np.stack(
        [np.arange(n_chunks, dtype="<u8") * chunk_bytes, np.full(n_chunks, chunk_bytes, dtype="<u8")], axis=1
    )
    return index.astype("<u8").tobytes()


def check_shard_index(path: Path, n_chunks: int, chunk_bytes: int, used_chunks: int) -> bool:
    """True when the shard file at `path` ends with the index of back-to-back chunks (the first `used_chunks`
    entries compared; the others may be empty, as zarr marks chunks it never wrote)."""
    index_bytes = n_chunks * SHARD_INDEX_ENTRY
    size = path.stat().st_size
    found = np.fromfile(path, dtype="<u8", count=n_chunks * 2, offset=size - index_bytes).reshape(-1, 2)
    expected = np.frombuffer(shard_index(n_chunks, chunk_bytes), dtype="<u8").reshape(-1, 2)
    return bool(np.array_equal(found[:used_chunks], expected[:used_chunks]))
