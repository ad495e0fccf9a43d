"""`kdpipe verify STORE`: read every chunk file of a feature store and check it against the checksums in the
store's metadata, its size and its values (pipeline/store/verify.py).

Prints one line per bad chunk (store, array, chunk key, what is wrong) on stderr, then a summary, and exits
1 when a chunk is bad (2 when STORE is no complete feature store, as for every one-line error). A store
written before kdpipe recorded checksums has none to compare with: verify says so (sizes and values are
still checked) and `--write` records the checksums of the files as they are now, for arrays found sound.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import echo, error_line, run_stage


@run_stage
def command(
    store: Path = typer.Argument(..., help="Feature store (features.zarr) to verify."),
    write: bool = typer.Option(
        False, "--write", help="Record checksums for arrays that have none (a store written before they existed)."
    ),
) -> None:
    """Check every chunk file of a feature store against its recorded SHA-256, size and values (no NaN/inf)."""
    from pipeline.store.verify import verify_store

    report = verify_store(store, write=write)
    for bad in report.bad:
        error_line(bad.line(), prefix="bad chunk")
    echo(report.summary())
    if report.bad:
        raise typer.Exit(1)
