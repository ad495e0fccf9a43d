"""Parquet files of images and captions: `prepare.dataset.format: parquet` (Hugging Face datasets' files,
img2dataset's metadata, anyone's table).

Columns (`prepare.dataset.parquet`): `image_column` holds either a path (string, relative to image_root,
as in the JSONL/CSV formats) or the image itself: binary bytes, or Hugging Face datasets' image struct
`{bytes, path}` (its bytes are the image). `caption_column` holds a caption (string; null or "" = an unpaired
image) or a list of captions ([] = an unpaired image). `split_column`, when the file has it, names each row's
split (as the `split` key of the JSONL format). A row whose image is null is an unpaired text.

Image ids: a path is the id, as in every row format; an image held as bytes is `<file without .parquet>/<row>`
(the row in that file), or the value of `id_column` when it is set (img2dataset's `key`, say). Images held as
bytes are read in place (pipeline/data/image_source.py: container "parquet", member = the column, offset = the
row). Files are read in record batches without the image bytes (bounded memory whatever the file's size).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

_BATCH_ROWS = 8192


@dataclass(frozen=True)
class ParquetOptions:
    """Section `prepare.dataset.parquet`."""

    image_column: str = "image"  # a path (string), the image bytes (binary) or a {bytes, path} struct
    caption_column: str = "caption"  # a caption (string) or a list of captions
    split_column: str = "split"  # used when the file has it, as the split key of the JSONL format
    id_column: str | None = None  # images held as bytes: their id (default: <file without .parquet>/<row>)

    def __post_init__(self) -> None:
        for name in ("image_column", "caption_column", "split_column"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")


@dataclass(frozen=True)
class ParquetRow:
    where: str
    image: str | None  # a path (kind "path"), or None: an unpaired text (or an image held as bytes, see `row`)
    row: int  # the row in the file (images held as bytes are addressed by it)
    image_id: str | None  # images held as bytes: their id from id_column; None otherwise
    captions: list[Any]
    split: Any


def image_kind(path: Path, options: ParquetOptions) -> str:
    """ "path" or "bytes": what the file's image column holds (one InputError if neither)."""
    import pyarrow as pa

    schema = _schema(path)
    for column in (options.image_column, options.caption_column):
        if column not in schema.names:
            raise InputError(
                f"{path}: no column {column!r} (it has: {', '.join(schema.names)}); set prepare.dataset.parquet"
            )
    t = schema.field(options.image_column).type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "bytes"
    raise InputError(
        f"{path}: column {options.image_column!r} is {t}; expected a path (string), image bytes (binary) or a {{bytes, path}} struct"
    )


def parquet_rows(path: Path, options: ParquetOptions) -> Iterator[ParquetRow]:
    """Every row of the file, the image bytes left unread."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = image_kind(path, options)
    schema = _schema(path)
    image = options.image_column
    columns = [options.caption_column]
    if kind == "path":
        columns.append(image)  # images held as bytes are not read here: they stay on disk until decoded
    has_split = options.split_column in schema.names
    if has_split:
        columns.append(options.split_column)
    if options.id_column is not None:
        if options.id_column not in schema.names:
            raise InputError(f"{path}: no column {options.id_column!r} (prepare.dataset.parquet.id_column)")
        columns.append(options.id_column)
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            data = batch.to_pydict()
            present = _present(batch, image) if kind == "path" else [True] * batch.num_rows
            n = batch.num_rows
            for i in range(n):
                where = f"{path} row {row}"
                caption = data[options.caption_column][i]
                captions = caption if isinstance(caption, list) else ([] if caption in (None, "") else [caption])
                split = data[options.split_column][i] if has_split else None
                if not present[i]:
                    yield ParquetRow(where, None, row, None, captions, split)
                elif kind == "path":
                    yield ParquetRow(where, data[image][i], row, None, captions, split)
                else:
                    given = data[options.id_column][i] if options.id_column else None
                    if options.id_column and (given is None or not str(given).strip()):
                        raise InputError(f"{where}: no image id in column {options.id_column!r}")
                    yield ParquetRow(where, None, row, str(given) if options.id_column else None, captions, split)
                row += 1
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: cannot read the parquet file ({err})") from None


def _present(batch: Any, image: str) -> list[bool]:
    """Which rows of a batch have an image path (not null, not blank)."""
    return [
        p is not None and bool(str(p).strip()) for p in batch.column(batch.schema.get_field_index(image)).to_pylist()
    ]


def _schema(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet file ({err})") from None


__all__ = ["ParquetOptions", "ParquetRow", "parquet_rows", "image_kind"]
