"""Feature-store tools: `kdpipe export-hdf5`, `kdpipe import-hdf5`, `kdpipe import-dsmd`, and clip-retrieval's
layout: `kdpipe import-embeddings`, `kdpipe export-embeddings` (in stages/cli.py's COMMANDS).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from stages._common import NO_WAIT_OPTION, echo, run_stage, writing

_STORE_DTYPE_HELP = "Store dtype: float16 or float32 (default: the source's, else float16)."


@run_stage
def export_hdf5(
    store: Path = typer.Argument(..., help="Feature store (features.zarr) to export."),
    out: Path = typer.Option(..., "--out", help="HDF5 file to write."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Export a complete feature store to one HDF5 file (same layout; store attrs as JSON)."""
    from pipeline.store.hdf5 import export_hdf5 as export

    with writing(out, no_wait=no_wait):
        echo(f"export-hdf5: wrote {export(store, out)}")


@run_stage
def import_hdf5(
    source: Path = typer.Argument(..., help="HDF5 file in the export layout (/<split>/image_emb, ...)."),
    out: Path = typer.Option(..., "--out", help="Feature store to write."),
    index: Path = typer.Option(None, "--index", help="Dataset index directory to check the rows against."),
    teacher_name: str = typer.Option(None, "--teacher-name", help="Teacher name, if the file records none."),
    dtype: str = typer.Option(None, "--dtype", help=_STORE_DTYPE_HELP),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Build a feature store from teacher features in an HDF5 file."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.durable import naming
    from pipeline.store.hdf5 import import_hdf5 as do_import

    teacher = {"name": teacher_name} if teacher_name else None
    with writing(out, no_wait=no_wait), naming(out):  # zarr's writes name no file when the disk fills
        dataset = DatasetIndex.load(index) if index is not None else None
        echo(f"import-hdf5: wrote {do_import(source, out, index=dataset, teacher=teacher, dtype=dtype)}")


def _split_files(values: list[str], option: str) -> dict[str, Path]:
    out = {}
    for v in values:
        if "=" not in v:
            raise ConfigError(f"{option} {v!r}: expected SPLIT=PATH (e.g. test=img_feats.pt)")
        split, path = v.split("=", 1)
        out[split.strip()] = Path(path)
    return out


@run_stage
def import_dsmd(
    index: Path = typer.Option(..., "--index", help="Dataset index directory the features were computed from."),
    out: Path = typer.Option(..., "--out", help="Feature store to write."),
    images: list[str] = typer.Option(..., "--images", help="SPLIT=PATH of the per-caption image features [M, D]."),
    texts: list[str] = typer.Option(..., "--texts", help="SPLIT=PATH of the text features [M, D]."),
    teacher_name: str = typer.Option("dsmd-import", "--teacher-name", help="Teacher name to record."),
    dtype: str = typer.Option("float16", "--dtype", help="Store dtype: float16 or float32."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Build a feature store from DSMD-style per-caption tensors (each image feature repeated per caption)."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.durable import naming
    from pipeline.store.hdf5 import import_dsmd as do_import

    image_files, text_files = _split_files(images, "--images"), _split_files(texts, "--texts")
    if set(image_files) != set(text_files):
        raise ConfigError(f"--images names splits {sorted(image_files)} but --texts {sorted(text_files)}")
    files = {s: (image_files[s], text_files[s]) for s in image_files}
    with writing(out, no_wait=no_wait), naming(out):
        path = do_import(DatasetIndex.load(index), files, out, teacher={"name": teacher_name}, dtype=dtype)
    echo(f"import-dsmd: wrote {path}")


@run_stage
def import_embeddings(
    source: Path = typer.Argument(..., help="Directory in clip-retrieval's layout: img_emb/, text_emb/, metadata/."),
    index: Path = typer.Option(..., "--index", help="Dataset index directory to match the rows to."),
    out: Path = typer.Option(..., "--out", help="Feature store to write."),
    match: str = typer.Option("auto", "--match", help="Metadata column to match images by: image_path, key, auto."),
    teacher_name: str = typer.Option(None, "--teacher-name", help="Teacher name, if the embeddings record none."),
    dtype: str = typer.Option(None, "--dtype", help=_STORE_DTYPE_HELP),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Build a feature store from embeddings computed elsewhere (clip-retrieval, LAION's), matched to the index."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.clip_retrieval import import_embeddings as do_import
    from pipeline.store.durable import naming

    if match not in ("auto", "image_path", "key"):
        raise ConfigError(f"--match {match!r}: expected image_path, key or auto")
    teacher = {"name": teacher_name} if teacher_name else None
    with writing(out, no_wait=no_wait), naming(out):
        dataset = DatasetIndex.load(index)
        path = do_import(source, out, dataset, match=match, teacher=teacher, dtype=dtype)
    echo(f"import-embeddings: wrote {path}")


@run_stage
def export_embeddings(
    store: Path = typer.Argument(..., help="Feature store (features.zarr) to export."),
    index: Path = typer.Option(..., "--index", help="Dataset index the store was made from (for the captions)."),
    out: Path = typer.Option(..., "--out", help="Directory to write (img_emb/, text_emb/, metadata/)."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Write a feature store in clip-retrieval's layout, which autofaiss and clip-retrieval read."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.clip_retrieval import export_embeddings as export

    with writing(out, no_wait=no_wait):
        echo(f"export-embeddings: wrote {export(store, DatasetIndex.load(index), out)}")
