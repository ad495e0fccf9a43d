"""The compressed image cache: each row's pixels stored ENCODED (WebP lossless or JPEG), decoded when read.

`prepare.cache.format` chooses (pipeline/store/image_cache.py holds the default, `raw`):

| format        | pixels                          | bytes / 224 px photo | read, images/s per core |
|---------------|---------------------------------|----------------------|-------------------------|
| raw           | as resized                      | 150,528              | ~56,000 (a memcpy)      |
| webp          | identical (lossless)            | ~70,000 (46 %)       | ~840                    |
| jpeg, q 95    | lossy (4:4:4 chroma)            | ~28,700 (19 %)       | ~1,800                  |
| jpeg, q 90    | lossy (4:4:4 chroma)            | ~20,000 (13 %)       | ~2,050                  |

(bench/image_cache_bench.py on the package photos, per CPU-second of the reading thread; docs/performance.md
has the run and its load). Choose raw while the cache fits on local disk: it costs nothing to read. Choose
webp when it does not and the pixels must stay exactly those of the recipe (training is bit for bit the raw
cache's): 2.2x less disk, and a loader needs (pairs/s of training) / 840 cores to keep up. Choose jpeg for
the largest sets (CC12M: 1.8 TB raw, ~0.35 TB at q 95), where 5 to 7x less disk matters more than exact
pixels (PSNR ~42 dB at q 95, ~38.5 at q 90); (pairs/s) / 1,800 cores of decoding.

Layout, inside the image cache's Zarr group (attrs `encoding` = {"format", "quality"}):

    <split>/encoded   uint8 [B]      the encoded rows back to back: one shard of raw 1 MiB inner chunks (the
                                     shard file begins with the bytes, so np.memmap maps it; zarr reads slices)
    <split>/offsets   int64 [N + 1]  row i is encoded[offsets[i]:offsets[i+1]]

Any zarr reader gets row i as `PIL.Image.open(io.BytesIO(g["train/encoded"][o[i]:o[i+1]]))`. Writing: each
decode task encodes its block of rows into `<start>.bin` (+ `<start>.lengths.npy`) in the split's temp directory;
`assemble` concatenates the blocks in row order (leaving out dropped rows) into the shard file at publication.
Resume of distill stays exact: decoding is deterministic, and the loader threads still only map row -> pixels.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import InputError
from pipeline.store.chunk_files import SHARD_INDEX_ENTRY, check_shard_index, chunk_file, shard_index

ENCODED_ARRAY, OFFSETS_ARRAY = "encoded", "offsets"
INNER_CHUNK_BYTES = 1 << 20  # zarr reads a slice of `encoded` 1 MiB at a time; the shard is one file per split
_PIL_FORMATS = {"webp": "WEBP", "jpeg": "JPEG"}


@dataclass(frozen=True)
class CacheFormat:
    """Section `prepare.cache`: how the student image cache holds each image."""

    format: Literal["raw", "webp", "jpeg"] = "raw"  # raw: uint8 pixels, memory-mapped; webp: lossless; jpeg: lossy
    quality: int = 95  # jpeg only

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1..100, got {self.quality}")

    @property
    def encoded(self) -> bool:
        return self.format != "raw"

    def describe(self) -> dict[str, Any] | None:
        """The cache attr `encoding` (None for raw: a raw cache's attrs are what they always were)."""
        if not self.encoded:
            return None
        return {"format": self.format, **({"quality": self.quality} if self.format == "jpeg" else {})}


# -- encoding and decoding one image ------------------------------------------------------------------------
def encode_image(pixels: np.ndarray, encoding: dict[str, Any]) -> bytes:
    """uint8 [H, W, 3] -> the encoded bytes (deterministic: the same pixels always give the same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if encoding["format"] == "webp":
        image.save(buf, format="WEBP", lossless=True, quality=0, method=0)  # fastest lossless: 3 ms at 224 px
    else:
        image.save(
            buf, format="JPEG", quality=int(encoding["quality"]), subsampling=0 if encoding["quality"] >= 90 else 2
        )
    return buf.getvalue()


def decode_image_bytes(
    data: bytes | memoryview | np.ndarray, size: tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] (into `out` when given). PIL releases the GIL while it decodes.

    The size the row's header declares is checked before decoding (a row replaced by a few bytes that declare
    50,000 x 50,000 pixels is refused without decoding them: the decompression-bomb guard of this reader), and
    bytes PIL cannot decode are one line too, not PIL's exception from a loader thread."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.size != (size[1], size[0]):
                raise InputError(
                    f"an encoded cache row declares {im.size[0]} x {im.size[1]} pixels, expected {size[1]} x "
                    f"{size[0]}; run `kdpipe prepare` again"
                )
            im.load()
            pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:  # PIL's, as image_file
        raise InputError(
            f"an encoded cache row cannot be decoded ({type(err).__name__}: {err}); run `kdpipe prepare` again"
        ) from None
    if pixels.shape != (*size, 3):
        raise InputError(f"an encoded cache row decodes to {list(pixels.shape)}, expected {[*size, 3]}")
    if out is None:
        return pixels
    out[...] = pixels
    return out


def write_block(directory: Path | str, start_row: int, block: np.ndarray, encoding: dict[str, Any]) -> None:
    """Encode rows [k, H, W, 3] starting at `start_row` into `<start_row>.bin` and their lengths (a decode task)."""
    directory = Path(directory)
    encoded = [encode_image(row, encoding) for row in block]
    stem = directory / f"{start_row:012d}"
    with open(stem.with_suffix(".bin.partial"), "wb") as fh:
        for data in encoded:
            fh.write(data)
    np.save(stem.with_suffix(".lengths.npy"), np.array([len(d) for d in encoded], np.int64))
    os.replace(stem.with_suffix(".bin.partial"), stem.with_suffix(".bin"))  # last: a block is whole or absent


# -- assembling a split -----------------------------------------------------------------------------------------
def assemble(blocks: Path, n: int, drop: np.ndarray, data_file: Path) -> np.ndarray:
    """Concatenate the blocks of a split (rows 0..n-1, each row once) without rows `drop` into `data_file`,
    padded to whole inner chunks and followed by the shard index; returns offsets int64 [kept + 1]."""
    starts = sorted(int(p.name[:12]) for p in blocks.glob("*.bin"))
    dropped = set(np.asarray(drop, np.int64).tolist())
    lengths_all, pieces = [], []
    for s in starts:
        lengths = np.load(blocks / f"{s:012d}.lengths.npy")
        pieces.append((s, lengths))
        lengths_all.append((s, len(lengths)))
    covered = sum(k for _, k in lengths_all)
    if covered != n or [s for s, _ in lengths_all] != list(np.cumsum([0] + [k for _, k in lengths_all])[:-1]):
        raise RuntimeError(f"{blocks}: encoded blocks cover {covered} rows in gaps or overlaps, expected 0..{n - 1}")
    offsets = [0]
    with open(data_file, "wb") as out:
        for s, lengths in pieces:
            with open(blocks / f"{s:012d}.bin", "rb") as fh:
                for i, length in enumerate(lengths.tolist()):
                    data = fh.read(length)
                    if s + i in dropped:
                        continue
                    out.write(data)
                    offsets.append(offsets[-1] + length)
        total = offsets[-1]
        n_chunks = max(1, -(-total // INNER_CHUNK_BYTES))
        out.truncate(n_chunks * INNER_CHUNK_BYTES)  # zero padding of the last inner chunk
        out.seek(n_chunks * INNER_CHUNK_BYTES)
        out.write(shard_index(n_chunks, INNER_CHUNK_BYTES))
    return np.array(offsets, np.int64)


def create_arrays(group: Any, split: str, data_file: Path, offsets: np.ndarray) -> None:
    """The split's `encoded` and `offsets` arrays in the (temp) cache group, the assembled shard moved in."""
    from zarr.codecs import BytesCodec, ShardingCodec

    total = int(offsets[-1])
    n_chunks = max(1, -(-total // INNER_CHUNK_BYTES))  # as `assemble` laid the shard out
    arr = group.create_array(
        f"{split}/{ENCODED_ARRAY}",
        shape=(total,),
        dtype="uint8",
        chunks=(n_chunks * INNER_CHUNK_BYTES,),
        serializer=ShardingCodec(chunk_shape=(INNER_CHUNK_BYTES,), codecs=[BytesCodec()], index_codecs=[BytesCodec()]),
        compressors=None,
        filters=None,
        fill_value=0,
        dimension_names=["byte"],
    )
    shard = chunk_file(arr, (0,))
    shard.parent.mkdir(parents=True, exist_ok=True)
    os.replace(data_file, shard)
    off = group.create_array(
        f"{split}/{OFFSETS_ARRAY}",
        shape=offsets.shape,
        dtype="int64",
        compressors=None,
        filters=None,
        dimension_names=["row_edge"],
    )
    off[...] = offsets


# -- reading ------------------------------------------------------------------------------------------------------
class EncodedImages:
    """A split of an encoded cache as a read-only [N, H, W, 3] uint8 array whose rows are decoded on access
    (`images[i]`, `images[a:b]`, `images[rows]`, `np.take(images, rows, axis=0, out=...)`)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, size: tuple[int, int]) -> None:
        self.data, self.offsets, self.size = data, offsets, size
        self.shape = (len(offsets) - 1, size[0], size[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self.nbytes_encoded = int(offsets[-1])

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        return decode_image_bytes(self.data[self.offsets[i] : self.offsets[i + 1]], self.size, out)

    def take(self, indices: Any, axis: int = 0, out: np.ndarray | None = None, mode: str = "raise") -> np.ndarray:
        if axis != 0 or mode != "raise":
            raise NotImplementedError("EncodedImages.take gathers rows only (axis=0, mode='raise')")
        rows = np.asarray(indices, np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8) if out is None else out
        for k, r in enumerate(rows.tolist()):
            self.row(r if r >= 0 else r + len(self), out[k])
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.row(int(key) if key >= 0 else int(key) + len(self))
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        if key is Ellipsis:
            return self.take(np.arange(len(self)))
        return self.take(key)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


def open_encoded(where: str, group_path: Path, split: str, size: tuple[int, int]) -> EncodedImages:
    """Map a split of an encoded cache after checking its arrays (one InputError naming what is wrong)."""
    import zarr

    try:
        arr = zarr.open_array(group_path / split / ENCODED_ARRAY, mode="r")
        offsets = np.asarray(zarr.open_array(group_path / split / OFFSETS_ARRAY, mode="r")[...], np.int64)
    except Exception as err:  # noqa: BLE001 - any failure to open is a broken store for the user
        raise InputError(f"{where}: cannot open the encoded rows ({err})") from None
    total = int(arr.shape[0])
    if (
        offsets.ndim != 1
        or len(offsets) < 2
        or offsets[0] != 0
        or offsets[-1] != total
        or (np.diff(offsets) <= 0).any()
    ):
        raise InputError(f"{where}: offsets do not cut {total} encoded bytes into rows")
    path = chunk_file(arr, (0,))
    n_chunks = max(1, -(-total // INNER_CHUNK_BYTES))
    if not path.is_file() or path.stat().st_size != n_chunks * (INNER_CHUNK_BYTES + SHARD_INDEX_ENTRY):
        raise InputError(f"{where}: the encoded shard file is missing or has the wrong size")
    if not check_shard_index(path, n_chunks, INNER_CHUNK_BYTES, used_chunks=n_chunks):
        raise InputError(f"{where}: encoded inner chunks are not stored back to back from offset 0; cannot memory-map")
    data = np.memmap(path, dtype=np.uint8, mode="r", shape=(max(total, 1),))
    offsets.setflags(write=False)
    return EncodedImages(data, offsets, size)


__all__ = [
    "CacheFormat",
    "EncodedImages",
    "encode_image",
    "decode_image_bytes",
    "write_block",
    "assemble",
    "open_encoded",
]
