"""The student image cache `images.zarr`: uint8 [N, H, W, 3] per split, memory-mappable, readable with zarr.

Layout (a Zarr v3 group, readable by any zarr v3 implementation):

```
images.zarr/
  attrs: format = "kdpipe-images", version = 1, complete = true|false, fingerprint = <dataset index
         fingerprint>, image_size = [H, W], resize = {...how the images were made...}, splits = [...],
         chunk_images = C, plus whatever the writer adds (source_fingerprint, on_bad_image, n_bad, content =
         the index's digest of the image files' sha256s, ...)
  <split>/images   uint8 [N, H, W, 3], rows in the index order of that split
```

Each `<split>/images` array is ONE shard (one file, `c/0/0/0/0` by zarr's default chunk-key encoding) of
uncompressed inner chunks of C images
(`sharding_indexed` codec, inner codec `bytes`, index codec `bytes` without checksum, index at the end).
The inner chunks are written back to back from offset 0, so the file begins with the N images as raw
row-major bytes and `np.memmap` maps the whole split as one [N, H, W, 3] array without a copy; zarr reads
a slice through the shard index by byte ranges (no full read). One file per split also keeps DVC's
per-file hashing cheap. Opening checks each shard index before mapping, so a store whose chunks are not
laid out back to back (e.g. rewritten by another tool) is refused instead of being misread.

An ENCODED cache (`prepare.cache.format` webp or jpeg; attrs `encoding`) holds each split as `<split>/encoded` +
`<split>/offsets` instead, decoded row by row on read: pipeline/store/encoded_cache.py. `split(name)` then gives
an `EncodedImages`, which indexes like the [N, H, W, 3] array.

Writers build the store in a hidden temp directory next to `path`, set `complete = true` last and then
rename it into place: a crash never leaves something at `path` that looks finished. Metadata and attributes
go through zarr; the shard's rows are written in parts by many processes and its index by hand, which zarr
cannot do (`chunk_files`: one shard is written by zarr only whole).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.locks import read_lock
from pipeline.store.chunk_files import SHARD_INDEX_ENTRY, check_shard_index, chunk_file, shard_index
from pipeline.store.durable import fsync_tree, replace_dir, temp_beside
from pipeline.store.encoded_cache import EncodedImages, assemble, create_arrays, open_encoded, write_block
from pipeline.store.ownership import Output, claim

IMAGES_FORMAT = "kdpipe-images"
IMAGES_VERSION = 1
DEFAULT_CHUNK_IMAGES = 256
SPLIT_ARRAY = "images"  # <split>/images
_DATA_FILE = "rows.data"  # a split's rows while the builder fills them; becomes the shard file at publish


def _is_image_cache(path: Path) -> bool:
    return json.loads((path / "zarr.json").read_bytes())["attributes"]["format"] == IMAGES_FORMAT


IMAGE_CACHE = Output("an image cache", directory=True, recognise=_is_image_cache)  # what a build or update replaces


# -- reading -----------------------------------------------------------------------------------------
class ImageCache:
    """An opened, complete image cache. `split(name)` gives that split's images, mapped read-only (by
    `open_image_cache`, under the cache's lock)."""

    def __init__(self, path: Path, attrs: dict[str, Any]) -> None:
        self.path = path
        self.attrs = attrs
        self.splits: tuple[str, ...] = tuple(attrs["splits"])
        h, w = attrs["image_size"]
        self.image_size: tuple[int, int] = (int(h), int(w))
        self._maps: dict[str, np.ndarray] = {}

    @property
    def encoding(self) -> dict[str, Any] | None:
        """{"format", "quality"?} of an encoded cache, None for raw pixels."""
        return self.attrs.get("encoding")

    def split(self, name: str) -> np.ndarray | EncodedImages:
        """[N, H, W, 3] uint8 read-only np.memmap over the split's shard file, in index order (an encoded cache:
        an EncodedImages, indexed the same way, decoding the rows it gives)."""
        if name not in self.splits:
            raise InputError(f"{self.path}: no split {name!r} in the image cache; it has {', '.join(self.splits)}")
        if name not in self._maps:
            self._maps[name] = self._map(name)
        return self._maps[name]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.attrs.get('n_images', {}).get(s, '?')}" for s in self.splits)
        return f"ImageCache({self.path}, {self.image_size[0]}x{self.image_size[1]}, {sizes})"

    def _map(self, name: str) -> np.ndarray | EncodedImages:
        import zarr

        if self.encoding is not None:
            return open_encoded(f"{self.path}/{name}", self.path, name, self.image_size)
        where = f"{self.path}/{name}/{SPLIT_ARRAY}"
        try:
            arr = zarr.open_array(self.path / name / SPLIT_ARRAY, mode="r")
        except Exception as err:  # noqa: BLE001 - any failure to open is a broken store for the user
            raise InputError(f"{where}: cannot open the array ({err})") from None
        h, w = self.image_size
        shape = tuple(arr.shape)
        if arr.dtype != np.uint8 or len(shape) != 4 or shape[1:] != (h, w, 3):
            raise InputError(f"{where}: expected uint8 [N, {h}, {w}, 3], found {arr.dtype} {list(shape)}")
        n = shape[0]
        inner = _shard_layout(arr.metadata)
        if inner is None or arr.metadata.chunk_grid.chunk_shape[0] < n:
            raise InputError(f"{where}: not a kdpipe image array (expected one shard of uncompressed inner chunks)")
        chunk_bytes = inner * h * w * 3
        path = chunk_file(arr, (0, 0, 0, 0))
        if not path.is_file():
            raise InputError(f"{where}: shard file {path} is missing")
        outer_chunks = arr.metadata.chunk_grid.chunk_shape[0] // inner
        expected_size = outer_chunks * (chunk_bytes + SHARD_INDEX_ENTRY)
        if path.stat().st_size != expected_size:
            raise InputError(f"{where}: shard file has {path.stat().st_size} bytes, expected {expected_size}")
        if not check_shard_index(path, outer_chunks, chunk_bytes, used_chunks=-(-n // inner)):
            raise InputError(f"{where}: inner chunks are not stored back to back from offset 0; cannot memory-map")
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, h, w, 3))


def _shard_layout(metadata: Any) -> int | None:
    """Images per inner chunk if the array is [N,H,W,3] sharded along N with raw inner chunks, else None."""
    codecs = getattr(metadata, "codecs", ())
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return None
    sharding = codecs[0]
    names = [type(c).__name__ for c in sharding.codecs]
    index_names = [type(c).__name__ for c in sharding.index_codecs]
    if names != ["BytesCodec"] or index_names != ["BytesCodec"] or sharding.index_location.value != "end":
        return None
    inner = tuple(sharding.chunk_shape)
    outer = tuple(metadata.chunk_grid.chunk_shape)
    if inner[1:] != outer[1:] or tuple(metadata.shape[1:]) != inner[1:]:
        return None
    return int(inner[0])


def open_image_cache(
    path: Path | str, *, expect_fingerprint: str | None = None, wait: bool | None = None
) -> ImageCache:
    """Open a complete image cache; one-line InputError if it is missing, foreign, incomplete or stale.

    Under the cache's lock, shared (pipeline/locks.py `read_lock`): while prepare rewrites it this waits for
    prepare, or with wait=False (or under --no-wait) raises `OutputLocked` naming it. Every split is mapped
    here, so the pixels of the returned cache never change afterwards (prepare swaps a whole new directory in
    by renames)."""
    path = Path(path)
    with read_lock(path, wait=wait):
        cache = _open_image_cache(path, expect_fingerprint)
        for name in cache.splits:
            cache.split(name)
    return cache


def _open_image_cache(path: Path, expect_fingerprint: str | None) -> ImageCache:
    import zarr

    if not path.exists():
        raise InputError(f"{path}: no image cache here; run `kdpipe prepare` first")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001
        raise InputError(f"{path}: not a zarr v3 group (expected the image cache of `kdpipe prepare`)") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != IMAGES_FORMAT or attrs.get("version") != IMAGES_VERSION:
        raise InputError(
            f"{path}: not a {IMAGES_FORMAT} v{IMAGES_VERSION} store "
            f"(format={attrs.get('format')!r}, version={attrs.get('version')!r})"
        )
    if attrs.get("complete") is not True:
        raise InputError(f"{path}: image cache is incomplete (an interrupted write?); rerun `kdpipe prepare`")
    if expect_fingerprint is not None and attrs.get("fingerprint") != expect_fingerprint:
        raise InputError(
            f"{path}: image cache was made from dataset index {str(attrs.get('fingerprint'))[:12]}, "
            f"not {expect_fingerprint[:12]}; rerun `kdpipe prepare`"
        )
    return ImageCache(path, attrs)


# -- writing -----------------------------------------------------------------------------------------
def write_rows(data_file: Path | str, start_row: int, rows: np.ndarray) -> None:
    """Write images [k, H, W, 3] uint8 at row `start_row` of a split's data file (disjoint rows may be
    written concurrently from several processes)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    offset = start_row * int(np.prod(rows.shape[1:]))
    fd = os.open(data_file, os.O_WRONLY)
    try:
        view = memoryview(rows).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


class CacheBuilder:
    """Builds a store in a temp directory next to `path`, then publishes it atomically.

    Usage: `allocate` each split (returns its data file, sized for `n` images and zero-filled, which
    writers fill with `write_rows`), optionally `compact` a split to drop rows, `publish(attrs)` (writes
    the zarr metadata and shard indexes, sets complete = true last, renames into place), or `abort()`.
    With `encoding` (an encoded cache), `allocate` returns the split's block directory instead, which writers
    fill with encoded_cache.write_block; `compact` and `publish` assemble the blocks.
    """

    def __init__(
        self,
        path: Path | str,
        image_size: tuple[int, int],
        chunk_images: int = DEFAULT_CHUNK_IMAGES,
        encoding: dict[str, Any] | None = None,
    ):
        if chunk_images < 1:
            raise ValueError("chunk_images must be >= 1")
        self.path = Path(path)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.chunk_images = int(chunk_images)
        claim(self.path, IMAGE_CACHE)  # before the work; publish claims it again, just before the swap
        self.tmp = temp_beside(self.path)
        self.sizes: dict[str, int] = {}
        self.encoding = encoding
        self._allocated: dict[str, int] = {}  # encoded: rows the blocks hold; the rows in `_drop` are left out
        self._drop: dict[str, np.ndarray] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()

    @property
    def image_bytes(self) -> int:
        return self.image_size[0] * self.image_size[1] * 3

    def _padded(self, n: int) -> int:
        return -(-n // self.chunk_images) * self.chunk_images

    def data_file(self, split: str) -> Path:
        return self.tmp / split / SPLIT_ARRAY / _DATA_FILE

    def allocate(self, split: str, n: int) -> Path:
        if n < 1:
            raise ValueError(f"split {split!r} has no images")
        if self.encoding is not None:
            blocks = self.tmp / split / "blocks"
            blocks.mkdir(parents=True)
            self.sizes[split] = self._allocated[split] = n
            self._drop[split] = np.array([], np.int64)
            return blocks
        f = self.data_file(split)
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "wb") as fh:
            fh.truncate(self._padded(n) * self.image_bytes)  # sparse zeros: the padding of the last chunk
        self.sizes[split] = n
        return f

    def compact(self, split: str, drop: np.ndarray | list[int]) -> int:
        """Remove rows `drop` of a split, keeping the order of the others (an in-place sequential copy of
        the rows after the first dropped one); returns the new number of rows."""
        n = self.sizes[split]
        drop = np.unique(np.asarray(drop, dtype=np.int64))
        if len(drop) == 0:
            return n
        if self.encoding is not None:  # left out when the blocks are assembled
            self._drop[split] = drop
            self.sizes[split] = n - len(drop)
            if self.sizes[split] == 0:
                shutil.rmtree(self.tmp / split)
            return self.sizes[split]
        keep = np.ones(n, dtype=bool)
        keep[drop] = False
        kept = np.flatnonzero(keep)
        new_n = len(kept)
        f = self.data_file(split)
        h, w = self.image_size
        mm = np.memmap(f, dtype=np.uint8, mode="r+", shape=(n, h, w, 3))
        # move runs of consecutive kept rows down, in blocks so that memory stays bounded
        dst = int(drop[0])
        for start, stop in consecutive_runs(kept[kept > drop[0]]):
            for s in range(start, stop, self.chunk_images):
                e = min(stop, s + self.chunk_images)
                mm[dst : dst + (e - s)] = mm[s:e]
                dst += e - s
        mm.flush()
        del mm
        if new_n == 0:
            shutil.rmtree(self.tmp / split)
        else:
            with open(f, "r+b") as fh:
                fh.truncate(new_n * self.image_bytes)  # drop the stale rows after the last kept one...
                fh.truncate(self._padded(new_n) * self.image_bytes)  # ...and pad with zeros to whole chunks
        self.sizes[split] = new_n
        return new_n

    def publish(self, attrs: dict[str, Any]) -> None:
        """Write metadata and shard indexes, mark complete, and move the store to `path`."""
        import zarr
        from zarr.codecs import BytesCodec, ShardingCodec

        h, w = self.image_size
        splits = [s for s in self.sizes if self.sizes[s] > 0]
        group = zarr.open_group(self.tmp, mode="a", zarr_format=3)  # "w" would delete the data files
        base = {
            "format": IMAGES_FORMAT,
            "version": IMAGES_VERSION,
            "complete": False,
            "image_size": [h, w],
            "chunk_images": self.chunk_images,
            "splits": splits,
            "n_images": {s: self.sizes[s] for s in splits},
            **({} if self.encoding is None else {"encoding": self.encoding}),
        }
        group.attrs.update({**attrs, **base})
        for split in splits if self.encoding is not None else ():
            data = self.tmp / split / "encoded.data"
            offsets = assemble(self.tmp / split / "blocks", self._allocated[split], self._drop[split], data)
            shutil.rmtree(self.tmp / split / "blocks")
            create_arrays(group, split, data, offsets)
        for split in splits if self.encoding is None else ():
            n = self.sizes[split]
            outer = self._padded(n)
            f = self.data_file(split)
            if f.stat().st_size != outer * self.image_bytes:
                raise RuntimeError(f"{f}: data file has the wrong size")  # a bug in the writer, not user input
            arr = group.create_array(
                f"{split}/{SPLIT_ARRAY}",
                shape=(n, h, w, 3),
                dtype="uint8",
                chunks=(outer, h, w, 3),
                serializer=ShardingCodec(
                    chunk_shape=(self.chunk_images, h, w, 3), codecs=[BytesCodec()], index_codecs=[BytesCodec()]
                ),
                compressors=None,
                filters=None,
                fill_value=0,
                dimension_names=["image", "y", "x", "rgb"],
            )
            with open(f, "ab") as fh:
                fh.write(shard_index(outer // self.chunk_images, self.chunk_images * self.image_bytes))
            shard = chunk_file(arr, (0, 0, 0, 0))
            shard.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, shard)
        group.attrs["complete"] = True  # last write inside the temp dir; the rename below publishes it
        fsync_tree(self.tmp)
        replace_dir(self.tmp, self.path, IMAGE_CACHE)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class CacheUpdate:
    """Rewrites some rows of a published cache: the cache is copied to a temp directory next to it, the rows
    are written into the copy's shard files (`write_rows` at their row offsets: a shard begins with its rows
    as raw bytes), and the copy replaces the cache whole at `publish`. Copying costs one sequential read and
    write of the cache, far less than decoding it again, and keeps the guarantees of a full rebuild: a reader
    holding the old files (a running distill's memmap, a hard link in DVC's cache) never sees pixels change,
    and a crash leaves the old cache whole (the temp copy is removed by the next run)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        claim(self.path, IMAGE_CACHE)
        self.tmp = temp_beside(self.path)
        shutil.copytree(self.path, self.tmp)  # copy_file_range/sendfile under the hood; reflinks where supported

    def data_file(self, split: str) -> Path:
        import zarr

        return chunk_file(zarr.open_array(self.tmp / split / SPLIT_ARRAY, mode="r"), (0, 0, 0, 0))

    def publish(self, attrs: dict[str, Any]) -> None:
        import zarr

        zarr.open_group(self.tmp, mode="r+").attrs.update(attrs)
        fsync_tree(self.tmp)
        replace_dir(self.tmp, self.path, IMAGE_CACHE)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive integers in a sorted array."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def write_image_cache(
    path: Path | str,
    splits: dict[str, np.ndarray],
    *,
    fingerprint: str,
    meta: dict | None = None,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    encoding: dict[str, Any] | None = None,
) -> None:
    """Write arrays uint8 [N, H, W, 3] (one per split, same H, W) as an image cache, atomically (raw, or
    encoded with `encoding`, e.g. {"format": "webp"}: pipeline/store/encoded_cache.py).

    For tests and small tools; `kdpipe prepare` fills the same format in parallel through CacheBuilder."""
    if not splits:
        raise ValueError("no splits to write")
    sizes = {tuple(a.shape[1:]) for a in splits.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 3 or next(iter(sizes))[2] != 3:
        shapes = [a.shape for a in splits.values()]
        raise ValueError(f"expected uint8 [N, H, W, 3] arrays of one size, got shapes {shapes}")
    h, w, _ = next(iter(sizes))
    builder = CacheBuilder(path, (h, w), chunk_images, encoding=encoding)
    try:
        for name, images in splits.items():
            if images.dtype != np.uint8:
                raise ValueError(f"split {name!r}: expected uint8 images, got {images.dtype}")
            f = builder.allocate(name, len(images))
            for s in range(0, len(images), builder.chunk_images):
                if encoding is None:
                    write_rows(f, s, images[s : s + builder.chunk_images])
                else:
                    write_block(f, s, images[s : s + builder.chunk_images], encoding)
        builder.publish({**(meta or {}), "fingerprint": fingerprint, "resize": (meta or {}).get("resize", {})})
    except BaseException:
        builder.abort()
        raise
