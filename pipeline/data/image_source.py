"""Where an index row's image bytes are, and the one function that opens them: `open_image(ref)`.

An image is a file of its own (`jpg`, `png`, ... under the image root), a member of an uncompressed tar shard
(webdataset: read in place, never untarred) or a cell of a parquet file's image column (bytes, e.g. Hugging
Face datasets' `{"bytes", "path"}` image struct). The dataset index records which, per row (`ImageRef`:
pipeline/data/index.py stores the fields as columns), and every stage that decodes images (prepare, extract,
search) opens them through `open_image`, so that a row means the same pixels everywhere.

Tar members are addressed by the byte range of their data (`offset`, `length`), read from the tar headers when
the index is built: opening one is a seek and a read, with no scan of the shard. Parquet cells are addressed
by row number: their row group is read (one column) and kept by an `ImageFiles` for the next rows, which
prepare's blocks and extract's batches read in order.

A member's content hash (pipeline/data/file_hashes.py) is the sha256 of its bytes, the hash of the file it
would be when untarred: the same images give the same hashes whatever holds them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

Container = Literal["", "tar", "parquet"]
CONTAINERS: tuple[str, ...] = ("", "tar", "parquet")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are. `path` is absolute (or relative to the working directory)."""

    path: str  # the image file, or the tar shard / parquet file holding the image
    container: Container = ""  # "": a file of its own; "tar": a member of a tar shard; "parquet": a cell
    member: str = ""  # tar: the member's name; parquet: the image column
    offset: int = -1  # tar: first byte of the member's data; parquet: the row in the file
    length: int = -1  # tar: the member's length in bytes; parquet: unused (-1)

    @property
    def key(self) -> str:
        """The member's name inside its container (content-hash records key it by this)."""
        return self.member if self.container == "tar" else f"{self.member}[{self.offset}]"

    def describe(self) -> str:
        """How error lines name the image: the file, or the shard and member, or the parquet file and row."""
        if self.container == "tar":
            return f"{self.path} member {self.member}"
        if self.container == "parquet":
            return f"{self.path} row {self.offset} (column {self.member})"
        return self.path


class ImageFiles:
    """Reads the bytes of container members, keeping the last container (and parquet row group) open: rows
    read in index order touch each shard once. Not shared between processes (each worker makes its own)."""

    def __init__(self) -> None:
        self._file: tuple[str, Any] | None = None  # (path, open binary file)
        self._group: tuple[str, str, int, int, list] | None = None  # (path, column, first row, stop, cells)

    def read(self, ref: ImageRef) -> bytes:
        if ref.container == "tar":
            return self._read_tar(ref)
        if ref.container == "parquet":
            return self._read_parquet(ref)
        with open(ref.path, "rb") as fh:
            return fh.read()

    def _read_tar(self, ref: ImageRef) -> bytes:
        if self._file is None or self._file[0] != ref.path:
            self.close()
            self._file = (ref.path, open(ref.path, "rb", buffering=0))
        fh = self._file[1]
        data = os.pread(fh.fileno(), ref.length, ref.offset)
        if len(data) != ref.length:
            raise OSError(
                f"truncated shard: the member's {ref.length} bytes at offset {ref.offset} end past the end of the file"
            )
        return data

    def _read_parquet(self, ref: ImageRef) -> bytes:
        g = self._group
        if g is None or g[0] != ref.path or g[1] != ref.member or not g[2] <= ref.offset < g[3]:
            g = self._group = _parquet_row_group(ref.path, ref.member, ref.offset)
        value = g[4][ref.offset - g[2]]
        if isinstance(value, dict):  # Hugging Face datasets' image struct {"bytes", "path"}
            value = value.get("bytes")
        if not isinstance(value, bytes | bytearray) or not value:
            raise OSError("no image bytes in this cell")
        return bytes(value)

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parquet_row_group(path: str, column: str, row: int) -> tuple[str, str, int, int, list]:
    """(path, column, first row, stop row, the column's cells) of the row group holding `row`."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < first + n:
            cells = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
            return path, column, first, first + n, cells
        first += n
    raise OSError(f"row {row} is past the file's {first} rows")


def open_image(ref: ImageRef, files: ImageFiles | None = None) -> Image.Image:
    """The image of an index row, opened lazily by PIL (use as a context manager; `.load()` decodes it).

    A file of its own is opened by name (PIL reads only what it needs); a container member's bytes are read
    whole through `files` (a new ImageFiles when None). Raises OSError / PIL's errors for a missing, short or
    undecodable image, as Image.open does."""
    if not ref.container:
        return Image.open(ref.path)
    if files is None:
        with ImageFiles() as own:
            data = own.read(ref)
    else:
        data = files.read(ref)
    return Image.open(io.BytesIO(data))


__all__ = ["ImageRef", "ImageFiles", "open_image", "CONTAINERS"]
